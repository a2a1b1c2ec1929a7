//! The HTTP client for the studio: one method per endpoint, one error type that says what the
//! caller should do next (retry later, stop, forget, or tell the person).

use std::time::Duration;

use reqwest::{StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::api_base::ApiBase;
use super::protocol::{
    ClaimRequest, ClaimResponse, ErrorBody, FailRequest, Heartbeat, HeartbeatResponse,
    ProgressRequest, ProgressResponse, RegisterRequest, RegisterResponse, RegistrationDecision,
    ResultMeta,
};
use crate::http_body;
use crate::secret::Secret;

/// `studio-worker/<version>`, sent on every request.
pub const USER_AGENT: &str = concat!("studio-worker/", env!("CARGO_PKG_VERSION"));
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A long-poll claim may take `waitS` plus this (Conventions).
const CLAIM_GRACE: Duration = Duration::from_secs(15);
/// Uploads get the normal timeout plus one second per this many bytes (≈1 Mbit/s), so a
/// home connection's slow upstream is not mistaken for a dead studio.
const UPLOAD_BYTES_PER_SECOND: u64 = 128 * 1024;
/// The most of an error body we keep for a message.
const MAX_MESSAGE_CHARS: usize = 300;

/// What went wrong talking to the studio, sorted by what the caller does about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StudioError {
    /// Network trouble, a timeout, a 5xx, a 429/503, or a body that is not what the protocol
    /// says. Retry with backoff, waiting at least `retry_after` when the studio gave one.
    #[error("studio unreachable: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// 401: the token (or, when polling a registration, the secret) is not accepted.
    #[error("the studio does not accept this worker's credentials (401)")]
    Unauthorized,
    /// 404 or 410: the thing asked about is not (or no longer) there.
    #[error("the studio does not know this {what} ({status})")]
    NotFound { what: &'static str, status: u16 },
    /// 409: someone else holds what was asked about.
    #[error("conflict (409): {message}")]
    Conflict { message: String },
    /// Any other 4xx: the studio understood and said no. `message` is the studio's own.
    #[error("the studio refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
}

impl StudioError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// An approved worker's identity, sent as `Authorization: Bearer` on every call after §1.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub worker_id: String,
    pub auth_token: Secret,
}

#[derive(Clone, Debug)]
pub struct StudioClient {
    http: reqwest::Client,
    base: ApiBase,
    timeout: Duration,
}

impl StudioClient {
    pub fn with_timeout(base: ApiBase, timeout: Duration) -> Result<Self, StudioError> {
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(timeout)
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            // Plain http is only ever allowed to loopback (see `ApiBase`); never follow a
            // redirect that could carry the token elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| StudioError::Transient {
                reason: format!("cannot set up HTTPS: {err}"),
                retry_after: None,
            })?;
        Ok(Self {
            http,
            base,
            timeout,
        })
    }

    /// §1.1: create a registration request.
    pub async fn create_registration(
        &self,
        body: &RegisterRequest,
    ) -> Result<RegisterResponse, StudioError> {
        let url = self.base.endpoint(&["workers", "register-request"]);
        let request = self.http.post(url).json(body);
        self.send_json(request, "registration request").await
    }

    /// §1.2: ask for the operator's decision, proving with the secret that we made the request.
    pub async fn poll_registration(
        &self,
        request_id: &str,
        secret: &Secret,
    ) -> Result<RegistrationDecision, StudioError> {
        let url = self
            .base
            .endpoint(&["workers", "register-requests", request_id]);
        let request = self
            .http
            .get(url)
            .header("X-Registration-Secret", secret.expose());
        self.send_json(request, "registration request").await
    }

    /// §2.
    pub async fn heartbeat(
        &self,
        credentials: &Credentials,
        body: &Heartbeat,
    ) -> Result<HeartbeatResponse, StudioError> {
        let url = self
            .base
            .endpoint(&["workers", &credentials.worker_id, "heartbeat"]);
        self.send_json(self.authorized_post(url, credentials, body), "worker")
            .await
    }

    /// §3.1: ask for a job, waiting up to `waitS` for one. `None` is the studio's `204`.
    pub async fn claim(
        &self,
        credentials: &Credentials,
        body: &ClaimRequest,
    ) -> Result<Option<serde_json::Value>, StudioError> {
        let url = self
            .base
            .endpoint(&["workers", &credentials.worker_id, "jobs", "claim"]);
        let request = self
            .authorized_post(url, credentials, body)
            .timeout(Duration::from_secs(body.wait_s) + CLAIM_GRACE);
        let response = self.send(request, "worker").await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let claimed: ClaimResponse = parse_body(response).await?;
        Ok(Some(claimed.job))
    }

    /// §3.2: report where the job is and renew its lease.
    pub async fn progress(
        &self,
        credentials: &Credentials,
        job_id: &str,
        body: &ProgressRequest,
    ) -> Result<ProgressResponse, StudioError> {
        let url = self.base.endpoint(&["jobs", job_id, "progress"]);
        self.send_json(self.authorized_post(url, credentials, body), "job")
            .await
    }

    /// §3.3: upload the finished images (PNG bytes, in order) with their metadata.
    pub async fn upload_result(
        &self,
        credentials: &Credentials,
        job_id: &str,
        meta: &ResultMeta,
        images: Vec<Vec<u8>>,
    ) -> Result<(), StudioError> {
        let url = self.base.endpoint(&["jobs", job_id, "result"]);
        let meta = serde_json::to_vec(meta).map_err(|err| StudioError::Transient {
            reason: format!("cannot encode the result's metadata: {err}"),
            retry_after: None,
        })?;
        let total_bytes: u64 = images.iter().map(|png| png.len() as u64).sum();
        let mut form = reqwest::multipart::Form::new().part(
            "meta",
            reqwest::multipart::Part::bytes(meta)
                .mime_str("application/json")
                .map_err(transport_error)?,
        );
        for (index, png) in images.into_iter().enumerate() {
            let part = reqwest::multipart::Part::bytes(png)
                .file_name(format!("image-{index}.png"))
                .mime_str("image/png")
                .map_err(transport_error)?;
            form = form.part("image", part);
        }
        let request = self
            .http
            .post(url)
            .bearer_auth(credentials.auth_token.expose())
            .multipart(form)
            .timeout(self.timeout + Duration::from_secs(total_bytes / UPLOAD_BYTES_PER_SECOND));
        self.send(request, "job").await.map(drop)
    }

    /// §3.4: hand a job back, saying why.
    pub async fn fail(
        &self,
        credentials: &Credentials,
        job_id: &str,
        body: &FailRequest,
    ) -> Result<(), StudioError> {
        let url = self.base.endpoint(&["jobs", job_id, "fail"]);
        self.send(self.authorized_post(url, credentials, body), "job")
            .await
            .map(drop)
    }

    fn authorized_post(
        &self,
        url: reqwest::Url,
        credentials: &Credentials,
        body: &impl Serialize,
    ) -> reqwest::RequestBuilder {
        self.http
            .post(url)
            .bearer_auth(credentials.auth_token.expose())
            .json(body)
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        what: &'static str,
    ) -> Result<T, StudioError> {
        let response = self.send(request, what).await?;
        parse_body(response).await
    }

    /// Sends and sorts the status: 2xx comes back, everything else becomes a [`StudioError`].
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        what: &'static str,
    ) -> Result<reqwest::Response, StudioError> {
        let response = request.send().await.map_err(transport_error)?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = retry_after(response.headers());
        let message = error_message(response).await;
        Err(classify(status, message, retry_after, what))
    }
}

async fn parse_body<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, StudioError> {
    let bytes = match http_body::read_capped(response, http_body::MAX_JSON_BYTES).await {
        Ok(bytes) => bytes,
        Err(http_body::BodyError::Transport(err)) => return Err(transport_error(err)),
        Err(err @ http_body::BodyError::TooLarge { .. }) => {
            return Err(StudioError::Transient {
                reason: format!("the studio's {err}"),
                retry_after: None,
            });
        }
    };
    serde_json::from_slice(&bytes).map_err(|err| StudioError::Transient {
        reason: format!("the studio's answer is not valid protocol JSON ({err})"),
        retry_after: None,
    })
}

fn classify(
    status: StatusCode,
    message: String,
    retry_after: Option<Duration>,
    what: &'static str,
) -> StudioError {
    match status.as_u16() {
        401 => StudioError::Unauthorized,
        404 | 410 => StudioError::NotFound {
            what,
            status: status.as_u16(),
        },
        409 => StudioError::Conflict { message },
        429 | 503 => StudioError::Transient {
            reason: format!("the studio is busy ({status})"),
            retry_after,
        },
        code if (400..500).contains(&code) => StudioError::Refused {
            status: code,
            message,
        },
        _ => StudioError::Transient {
            reason: format!("the studio answered {status}"),
            retry_after,
        },
    }
}

fn transport_error(err: reqwest::Error) -> StudioError {
    let reason = if err.is_timeout() {
        "the request timed out".to_owned()
    } else if err.is_connect() {
        "cannot connect".to_owned()
    } else {
        // reqwest's Display names the URL, which holds ids but never a token or secret.
        format!("{err}")
    };
    StudioError::Transient {
        reason,
        retry_after: None,
    }
}

/// `Retry-After` in seconds (the only form the protocol uses); an HTTP date is ignored.
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // A studio asking for more than a day is a bug; do not go dark for longer.
    Some(Duration::from_secs(seconds.min(24 * 60 * 60)))
}

/// The studio's `{"error": "…"}`, or the start of whatever it sent, as one printable line.
async fn error_message(response: reqwest::Response) -> String {
    let status = response.status();
    let bytes = http_body::read_prefix(response, http_body::MAX_ERROR_BYTES).await;
    let text = match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) => body.error,
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    };
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_MESSAGE_CHARS)
        .collect();
    let line = line.trim();
    if line.is_empty() {
        status.to_string()
    } else {
        line.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_sort_into_what_to_do() {
        let classify = |code: u16| {
            classify(
                StatusCode::from_u16(code).unwrap(),
                "m".into(),
                None,
                "worker",
            )
        };
        assert!(classify(500).is_transient());
        assert!(classify(502).is_transient());
        assert!(classify(503).is_transient());
        assert!(classify(429).is_transient());
        assert_eq!(classify(401), StudioError::Unauthorized);
        assert!(matches!(
            classify(404),
            StudioError::NotFound { status: 404, .. }
        ));
        assert!(matches!(
            classify(410),
            StudioError::NotFound { status: 410, .. }
        ));
        assert!(matches!(classify(409), StudioError::Conflict { .. }));
        assert!(matches!(
            classify(403),
            StudioError::Refused { status: 403, .. }
        ));
        assert!(matches!(
            classify(413),
            StudioError::Refused { status: 413, .. }
        ));
        assert!(matches!(
            classify(422),
            StudioError::Refused { status: 422, .. }
        ));
    }

    #[test]
    fn retry_after_reads_seconds_and_caps_them() {
        let mut headers = header::HeaderMap::new();
        headers.insert(header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(header::RETRY_AFTER, "99999999".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(86_400)));
        headers.insert(
            header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }
}

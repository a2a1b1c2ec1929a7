//! The JSON bodies of studio-api.md, as Rust types. Field names are camelCase on the wire;
//! unknown fields in responses are ignored; a missing required field fails to parse and is
//! treated like a 5xx by the client.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::secret::Secret;
use crate::vocab::device::DeviceInfo;
use crate::vocab::pause::PauseReason;
use crate::vocab::progress::Stage;

/// §1.1 `POST /workers/register-request`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    pub install_id: String,
    pub registration_secret_hash: String,
    pub user_agent: String,
    pub worker_name: String,
    pub capabilities: Capabilities,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    pub request_id: String,
}

/// §1.2 the answer to `GET /workers/register-requests/{requestId}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum RegistrationDecision {
    #[serde(rename_all = "camelCase")]
    Pending {
        #[serde(default)]
        poll_after_s: Option<u64>,
    },
    #[serde(rename_all = "camelCase")]
    Approved {
        worker_id: String,
        auth_token: Secret,
    },
    #[serde(rename_all = "camelCase")]
    Rejected {
        #[serde(default)]
        reason: Option<String>,
    },
}

/// §2 `POST /workers/{workerId}/heartbeat`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    pub state: WorkerState,
    pub paused_reason: Option<PauseReason>,
    pub current_job_id: Option<String>,
    pub capabilities: Capabilities,
    pub stats: Stats,
    pub sent_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Idle,
    Busy,
    Paused,
    Loading,
    Error,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub uptime_s: u64,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub images_generated: u64,
    pub last_job_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResponse {
    /// Optional on the wire (we default to 30 s); clamped to 5…300 s by the worker.
    #[serde(default)]
    pub next_heartbeat_s: Option<u64>,
    /// Optional on the wire; absent means "no change requested", i.e. `false`.
    #[serde(default)]
    pub pause: bool,
}

/// §4.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    pub agent_version: String,
    pub os: String,
    pub arch: String,
    pub device: DeviceInfo,
    pub models: Vec<ModelReadiness>,
    pub max_width: u32,
    pub max_height: u32,
    pub max_images: u32,
    pub kinds: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelReadiness {
    pub id: String,
    pub ready: bool,
}

/// §3.1 `POST /workers/{workerId}/jobs/claim`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRequest {
    pub models: Vec<String>,
    pub max_width: u32,
    pub max_height: u32,
    pub wait_s: u64,
}

/// §3.1 `200 {"job": Job}`. The job stays raw JSON here: it is validated field by field
/// (`jobs::validate`) so that a hostile or malformed job is answered with `fail`, not a
/// parse error.
#[derive(Clone, Debug, Deserialize)]
pub struct ClaimResponse {
    pub job: serde_json::Value,
}

/// §3.2 `POST /jobs/{jobId}/progress`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressRequest {
    pub worker_id: String,
    pub stage: Stage,
    pub step: u32,
    pub total_steps: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressResponse {
    #[serde(default)]
    pub cancel: bool,
    /// The renewed lease; absent when cancelling (or when the studio keeps the old one).
    #[serde(default)]
    pub lease_s: Option<u64>,
}

/// §3.3 the `meta` part of a result upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultMeta {
    pub worker_id: String,
    pub seed: u64,
    pub elapsed_ms: u64,
    pub model: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
}

/// §3.4 `POST /jobs/{jobId}/fail`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailRequest {
    pub worker_id: String,
    pub code: FailCode,
    /// Human-readable, no secrets, no file paths.
    pub error: String,
    pub retryable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailCode {
    InvalidParams,
    ModelUnavailable,
    Oom,
    Paused,
    Internal,
}

/// The most bytes an id may have (studio-api.md, Conventions).
pub const MAX_ID_BYTES: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("it is empty")]
    Empty,
    #[error("it is {0} bytes long (at most 128)")]
    TooLong(usize),
    #[error("it contains control characters")]
    ControlCharacters,
}

/// Ids are opaque, but a worker rejects empty ones, ones over 128 bytes, and ones with control
/// characters (they would end up in logs, paths and headers).
pub fn check_id(id: &str) -> Result<(), InvalidId> {
    if id.is_empty() {
        Err(InvalidId::Empty)
    } else if id.len() > MAX_ID_BYTES {
        Err(InvalidId::TooLong(id.len()))
    } else if id.chars().any(char::is_control) {
        Err(InvalidId::ControlCharacters)
    } else {
        Ok(())
    }
}

/// An error body, when the studio sends one.
#[derive(Clone, Debug, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::device::DeviceKind;

    #[test]
    fn decisions_parse_with_unknown_fields_and_refuse_missing_ones() {
        let pending: RegistrationDecision =
            serde_json::from_str(r#"{"status":"pending","pollAfterS":12,"extra":[1]}"#).unwrap();
        assert!(matches!(
            pending,
            RegistrationDecision::Pending {
                poll_after_s: Some(12)
            }
        ));
        let approved: RegistrationDecision =
            serde_json::from_str(r#"{"status":"approved","workerId":"w_1","authToken":"t"}"#)
                .unwrap();
        assert!(matches!(approved, RegistrationDecision::Approved { .. }));
        assert!(
            serde_json::from_str::<RegistrationDecision>(
                r#"{"status":"approved","workerId":"w_1"}"#
            )
            .is_err(),
            "approved without a token is a protocol error"
        );
        assert!(serde_json::from_str::<RegistrationDecision>(r#"{"status":"maybe"}"#).is_err());
    }

    #[test]
    fn heartbeat_serialises_as_the_spec_shows() {
        let heartbeat = Heartbeat {
            state: WorkerState::Paused,
            paused_reason: Some(PauseReason::Studio),
            current_job_id: None,
            capabilities: Capabilities {
                agent_version: "0.1.0".into(),
                os: "linux".into(),
                arch: "x86_64".into(),
                device: DeviceInfo {
                    kind: DeviceKind::Cpu,
                    name: "cpu".into(),
                    memory_mb: 1,
                },
                models: vec![],
                max_width: 1024,
                max_height: 1024,
                max_images: 4,
                kinds: vec!["txt2img".into()],
            },
            stats: Stats::default(),
            sent_at: DateTime::parse_from_rfc3339("2026-11-26T20:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
        };
        let json = serde_json::to_value(&heartbeat).unwrap();
        assert_eq!(json["state"], "paused");
        assert_eq!(json["pausedReason"], "studio");
        assert_eq!(json["currentJobId"], serde_json::Value::Null);
        assert_eq!(json["sentAt"], "2026-11-26T20:00:00Z");
        assert_eq!(json["capabilities"]["device"]["memoryMb"], 1);
        assert_eq!(json["stats"]["jobsCompleted"], 0);
    }

    #[test]
    fn ids_are_bounded_and_printable() {
        assert_eq!(check_id("j_123"), Ok(()));
        assert_eq!(check_id(&"x".repeat(128)), Ok(()));
        assert_eq!(check_id(&"x".repeat(129)), Err(InvalidId::TooLong(129)));
        assert_eq!(check_id(""), Err(InvalidId::Empty));
        assert_eq!(check_id("j_1\n"), Err(InvalidId::ControlCharacters));
        assert_eq!(check_id("j\u{7f}"), Err(InvalidId::ControlCharacters));
        // 43 three-byte characters are 129 bytes: the limit is bytes, not characters.
        assert_eq!(check_id(&"€".repeat(43)), Err(InvalidId::TooLong(129)));
    }

    #[test]
    fn heartbeat_response_fields_are_optional() {
        let response: HeartbeatResponse = serde_json::from_str("{}").unwrap();
        assert_eq!(response.next_heartbeat_s, None);
        assert!(!response.pause);
    }
}

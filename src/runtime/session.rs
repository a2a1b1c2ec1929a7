//! The studio as the approved worker talks to it: every call carries the worker's
//! credentials, and a `401` on any of them is recorded here, once, as "revoked" (§2). Callers
//! still get [`StudioError::Unauthorized`] back, to stop what they were doing.

use crate::backoff::Backoff;
use crate::config::SharedConfig;
use crate::registration::RegistrationState;
use crate::studio::protocol::FailCode;
use crate::studio::protocol::{
    ClaimRequest, FailRequest, Heartbeat, HeartbeatResponse, ProgressRequest, ProgressResponse,
    ResultMeta,
};
use crate::studio::{Credentials, StudioClient, StudioError};
use crate::timing::Timing;

#[derive(Clone)]
pub(super) struct Session {
    client: StudioClient,
    config: SharedConfig,
    credentials: Credentials,
}

impl Session {
    /// The session of the worker the config holds, while it is approved and not revoked.
    pub(super) fn current(client: &StudioClient, config: &SharedConfig) -> Option<Self> {
        let snapshot = config.snapshot();
        match (
            RegistrationState::from_config(&snapshot),
            &snapshot.auth_token,
        ) {
            (RegistrationState::Approved { worker_id }, Some(auth_token)) => Some(Self {
                client: client.clone(),
                config: config.clone(),
                credentials: Credentials {
                    worker_id,
                    auth_token: auth_token.clone(),
                },
            }),
            _ => None,
        }
    }

    pub(super) fn worker_id(&self) -> &str {
        &self.credentials.worker_id
    }

    /// §2.
    pub(super) async fn heartbeat(
        &self,
        body: &Heartbeat,
    ) -> Result<HeartbeatResponse, StudioError> {
        self.checked(self.client.heartbeat(&self.credentials, body).await)
            .await
    }

    /// §3.1: `None` is the studio's `204`.
    pub(super) async fn claim(
        &self,
        body: &ClaimRequest,
    ) -> Result<Option<serde_json::Value>, StudioError> {
        self.checked(self.client.claim(&self.credentials, body).await)
            .await
    }

    /// §3.2.
    pub(super) async fn progress(
        &self,
        job_id: &str,
        body: &ProgressRequest,
    ) -> Result<ProgressResponse, StudioError> {
        self.checked(self.client.progress(&self.credentials, job_id, body).await)
            .await
    }

    /// §3.3.
    pub(super) async fn upload_result(
        &self,
        job_id: &str,
        meta: &ResultMeta,
        images: Vec<Vec<u8>>,
    ) -> Result<(), StudioError> {
        self.checked(
            self.client
                .upload_result(&self.credentials, job_id, meta, images)
                .await,
        )
        .await
    }

    /// §3.4.
    pub(super) async fn fail(&self, job_id: &str, body: &FailRequest) -> Result<(), StudioError> {
        self.checked(self.client.fail(&self.credentials, job_id, body).await)
            .await
    }

    async fn checked<T>(&self, answer: Result<T, StudioError>) -> Result<T, StudioError> {
        if matches!(answer, Err(StudioError::Unauthorized)) {
            self.revoked().await;
        }
        answer
    }

    /// The studio no longer accepts this worker: every loop waits for a reset from now on
    /// (the heartbeat tells the person). A reset made meanwhile is not undone. Recorded in
    /// memory even when the settings cannot be saved: all traffic stops either way.
    async fn revoked(&self) {
        let worker_id = self.credentials.worker_id.clone();
        let ours = worker_id.clone();
        let (newly, saved) = self
            .config
            .apply_even_unsaved(move |c| {
                let ours = c.worker_id.as_deref() == Some(ours.as_str());
                let newly = ours && !c.access_revoked;
                if ours {
                    c.access_revoked = true;
                }
                newly
            })
            .await;
        if newly == Some(true) {
            tracing::warn!(
                worker_id = %worker_id,
                "the studio revoked this worker's access; reset the registration to ask again"
            );
        }
        if let Err(err) = saved {
            tracing::error!("the revocation holds, but cannot be saved: {err}");
        }
    }
}

/// §3.4: tells the studio this worker will not finish the job (handed back, refused, or
/// failed), `retryable` saying whether another worker may try. Retried a few times on
/// transient errors; after that the studio's lease expiry takes over.
pub(super) async fn report_fail(
    session: &Session,
    timing: &Timing,
    job_id: &str,
    code: FailCode,
    message: &str,
    retryable: bool,
) {
    let body = FailRequest {
        worker_id: session.worker_id().to_owned(),
        code,
        // Errors from libraries carry file paths (and so user names): the one place where
        // text leaves for the studio takes them out.
        error: crate::redact::for_studio(message),
        retryable,
    };
    let mut backoff = Backoff::new(timing.backoff);
    for _ in 0..4 {
        match session.fail(job_id, &body).await {
            Ok(())
            | Err(
                StudioError::NotFound { .. }
                | StudioError::Conflict { .. }
                | StudioError::Unauthorized,
            ) => return,
            Err(err) if err.is_transient() => {
                let delay = backoff.next_delay(err.retry_after());
                tracing::debug!(job_id, "fail not delivered ({err}); retrying in {delay:?}");
                tokio::time::sleep(delay).await;
            }
            Err(err) => {
                tracing::warn!(job_id, "the studio refused the fail report: {err}");
                return;
            }
        }
    }
    tracing::warn!(
        job_id,
        "could not report the job back; the studio will reassign it when its lease runs out"
    );
}

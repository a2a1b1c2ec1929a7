//! The registration state machine (`Registrar::tick`) against the in-process studio: every
//! transition, a restart between every step (state rebuilt from the file), and a studio that
//! fails during every step.

use std::time::Duration;

use sha2::{Digest as _, Sha256};
use studio_worker::registration::{Registrar, RegistrationError, RegistrationState};
use studio_worker::studio::protocol::Capabilities;
use studio_worker::studio::{ApiBase, StudioClient, StudioError};
use studio_worker::vocab::device::{DeviceInfo, DeviceKind};

use crate::support::studio::{Fault, Route, TestStudio};
use crate::support::{WorkerHome, fast_timing};

struct Fixture {
    studio: TestStudio,
    home: WorkerHome,
}

/// What a worker without an engine announces (§4).
fn capabilities() -> Capabilities {
    Capabilities {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        device: DeviceInfo {
            kind: DeviceKind::Cpu,
            name: "CPU".to_owned(),
            memory_mb: 1024,
        },
        models: Vec::new(),
        max_width: 0,
        max_height: 0,
        max_images: 0,
        kinds: vec!["txt2img".to_owned()],
    }
}

impl Fixture {
    async fn new() -> Self {
        let studio = TestStudio::start().await;
        let home = WorkerHome::new();
        home.write_config(&studio.url());
        Self { studio, home }
    }

    /// A registrar built from what is on disk, as a freshly (re)started worker would.
    fn registrar(&self) -> Registrar {
        let base = ApiBase::parse(&self.studio.url()).unwrap();
        let client = StudioClient::with_timeout(base, fast_timing().request_timeout).unwrap();
        Registrar::new(client, self.home.shared(), fast_timing())
    }

    async fn tick(&self) -> Result<RegistrationState, RegistrationError> {
        self.registrar()
            .tick(&capabilities())
            .await
            .map(|outcome| outcome.state)
    }

    fn file_bytes(&self) -> Vec<u8> {
        std::fs::read(self.home.config_path()).unwrap()
    }

    async fn pending(&self) -> String {
        match self.tick().await.unwrap() {
            RegistrationState::Pending { request_id, .. } => request_id,
            other => panic!("expected pending, got {other:?}"),
        }
    }
}

fn transient(result: Result<RegistrationState, RegistrationError>) -> StudioError {
    match result {
        Err(RegistrationError::Studio(err)) if err.is_transient() => err,
        other => panic!("expected a transient studio error, got {other:?}"),
    }
}

#[tokio::test]
async fn first_tick_creates_a_request_and_sends_only_the_hash() {
    let f = Fixture::new().await;
    let request_id = f.pending().await;

    let config = f.home.on_disk();
    let secret = config.registration_secret.clone().expect("secret saved");
    let install_id = config.install_id.clone().expect("install id saved");
    assert_eq!(
        config.registration_request_id.as_deref(),
        Some(request_id.as_str())
    );
    assert!(config.registration_requested_at.is_some());
    assert_eq!(
        uuid::Uuid::parse_str(&install_id)
            .unwrap()
            .get_version_num(),
        4
    );

    let log = f.studio.log_for(Route::Register);
    assert_eq!(log.len(), 1);
    let sent = &log[0];
    assert_eq!(
        sent.body["registrationSecretHash"],
        hex::encode(Sha256::digest(secret.expose().as_bytes()))
    );
    assert_eq!(sent.body["installId"], install_id);
    assert_eq!(sent.body["workerName"], "test-rig");
    assert_eq!(
        sent.body["userAgent"],
        concat!("studio-worker/", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        sent.user_agent.as_deref(),
        Some(concat!("studio-worker/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(sent.body["capabilities"]["kinds"][0], "txt2img");
    assert!(
        !sent.body.to_string().contains(secret.expose()),
        "the secret itself never leaves the machine on creation"
    );
    assert_eq!(sent.registration_secret, None);
    assert_eq!(sent.authorization, None);
}

#[tokio::test]
async fn polling_a_pending_request_changes_nothing_on_disk() {
    let f = Fixture::new().await;
    f.studio.set_poll_after_s(Some(45));
    let request_id = f.pending().await;
    let before = f.file_bytes();

    for _ in 0..3 {
        let outcome = f.registrar().tick(&capabilities()).await.unwrap();
        assert!(matches!(outcome.state, RegistrationState::Pending { .. }));
        // pollAfterS is honoured, within the timing's clamp (fast timing caps at 100 ms).
        assert_eq!(outcome.next_tick, Some(fast_timing().poll_cap));
    }
    assert_eq!(
        f.file_bytes(),
        before,
        "a pending answer must not rewrite the file"
    );

    let polls = f.studio.log_for(Route::Poll);
    assert_eq!(polls.len(), 3);
    let secret = f.home.on_disk().registration_secret.unwrap();
    for poll in polls {
        assert!(
            poll.path
                .ends_with(&format!("/workers/register-requests/{request_id}"))
        );
        assert_eq!(poll.registration_secret.as_deref(), Some(secret.expose()));
    }
}

#[tokio::test]
async fn approval_saves_the_credentials_and_forgets_request_and_secret() {
    let f = Fixture::new().await;
    let request_id = f.pending().await;
    let worker_id = f.studio.approve(&request_id).unwrap();

    assert_eq!(
        f.tick().await.unwrap(),
        RegistrationState::Approved {
            worker_id: worker_id.clone()
        }
    );
    let config = f.home.on_disk();
    assert_eq!(config.worker_id.as_deref(), Some(worker_id.as_str()));
    assert_eq!(
        config.auth_token.as_ref().map(|t| t.expose().to_owned()),
        Some(f.studio.worker(&worker_id).unwrap().token)
    );
    assert_eq!(config.registration_request_id, None);
    assert_eq!(config.registration_secret, None);
    assert!(config.install_id.is_some(), "the install id is kept");

    // Settled: further ticks make no request.
    let requests = f.studio.log().len();
    assert!(matches!(
        f.tick().await.unwrap(),
        RegistrationState::Approved { .. }
    ));
    assert_eq!(f.studio.log().len(), requests);
}

#[tokio::test]
async fn rejection_keeps_the_reason_and_stops_asking() {
    let f = Fixture::new().await;
    let request_id = f.pending().await;
    f.studio.reject(&request_id, "we only take RTX cards");

    assert_eq!(
        f.tick().await.unwrap(),
        RegistrationState::Rejected {
            reason: "we only take RTX cards".into()
        }
    );
    let config = f.home.on_disk();
    assert_eq!(config.registration_request_id, None);
    assert_eq!(config.registration_secret, None);
    assert_eq!(
        config.registration_rejected_reason.as_deref(),
        Some("we only take RTX cards")
    );

    let requests = f.studio.log().len();
    for _ in 0..3 {
        assert!(matches!(
            f.tick().await.unwrap(),
            RegistrationState::Rejected { .. }
        ));
    }
    assert_eq!(
        f.studio.log().len(),
        requests,
        "rejected: no request until a reset"
    );
}

#[tokio::test]
async fn a_request_the_studio_forgot_is_replaced_by_a_fresh_one() {
    for (name, forget) in [
        ("404", None),
        ("401", Some(Fault::Status(401))),
        ("403", Some(Fault::Status(403))),
    ] {
        let f = Fixture::new().await;
        let first_request = f.pending().await;
        let first_secret = f.home.on_disk().registration_secret.unwrap();
        match forget {
            None => f.studio.forget(&first_request),
            Some(fault) => f.studio.inject(Some(Route::Poll), fault, 1),
        }

        assert_eq!(
            f.tick().await.unwrap(),
            RegistrationState::Pristine,
            "{name}"
        );
        let config = f.home.on_disk();
        assert_eq!(config.registration_request_id, None, "{name}");
        assert_eq!(
            config.registration_secret, None,
            "{name}: the old secret is forgotten"
        );

        let second_request = f.pending().await;
        assert_ne!(second_request, first_request, "{name}");
        assert_ne!(
            f.home.on_disk().registration_secret.unwrap(),
            first_secret,
            "{name}: a fresh secret for the fresh request"
        );
    }
}

#[tokio::test]
async fn a_studio_that_fails_during_create_changes_nothing_that_matters() {
    for fault in [
        Fault::Status(500),
        Fault::Status(502),
        Fault::Garbage,
        Fault::MissingFields,
        Fault::Hang(Duration::from_secs(2)),
    ] {
        let f = Fixture::new().await;
        f.studio.inject(Some(Route::Register), fault.clone(), 1);
        let err = transient(f.tick().await);
        assert_eq!(
            RegistrationState::from_config(&f.home.on_disk()),
            RegistrationState::Pristine,
            "{fault:?}: {err}"
        );
        // The install id and secret were saved before sending, and are reused on the retry.
        let prepared = f.home.on_disk();
        let request_id = f.pending().await;
        let after = f.home.on_disk();
        assert_eq!(after.install_id, prepared.install_id, "{fault:?}");
        assert_eq!(
            after.registration_secret, prepared.registration_secret,
            "{fault:?}"
        );
        assert_eq!(
            after.registration_request_id.as_deref(),
            Some(request_id.as_str())
        );
    }
}

#[tokio::test]
async fn a_studio_that_fails_during_poll_changes_nothing_on_disk() {
    for fault in [
        Fault::Status(500),
        Fault::Status(503),
        Fault::Garbage,
        Fault::MissingFields,
        Fault::Hang(Duration::from_secs(2)),
    ] {
        let f = Fixture::new().await;
        let request_id = f.pending().await;
        f.studio.approve(&request_id).unwrap();
        let before = f.file_bytes();

        f.studio.inject(Some(Route::Poll), fault.clone(), 1);
        transient(f.tick().await);
        assert_eq!(f.file_bytes(), before, "{fault:?}");

        assert!(
            matches!(f.tick().await.unwrap(), RegistrationState::Approved { .. }),
            "{fault:?}: the next good poll finishes the job"
        );
    }
}

#[tokio::test]
async fn retry_after_and_refusals_reach_the_caller() {
    let f = Fixture::new().await;
    f.studio.inject(
        Some(Route::Register),
        Fault::RetryAfter {
            status: 429,
            seconds: 7,
        },
        1,
    );
    assert_eq!(
        transient(f.tick().await).retry_after(),
        Some(Duration::from_secs(7))
    );

    f.studio
        .inject(Some(Route::Register), Fault::Status(422), 1);
    match f.tick().await {
        Err(RegistrationError::Studio(StudioError::Refused { status, message })) => {
            assert_eq!(status, 422);
            assert_eq!(
                message, "injected fault",
                "the studio's own message is kept"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        RegistrationState::from_config(&f.home.on_disk()),
        RegistrationState::Pristine
    );
}

#[tokio::test]
async fn a_restart_between_every_step_continues_where_it_stopped() {
    // Every `tick` below builds a new registrar from the file: a restart before each step.
    let f = Fixture::new().await;
    let request_id = f.pending().await;
    assert_eq!(
        f.pending().await,
        request_id,
        "restart while pending: same request"
    );
    assert_eq!(f.pending().await, request_id);
    assert_eq!(
        f.studio.count(Route::Register),
        1,
        "no second request after restarts"
    );

    let worker_id = f.studio.approve(&request_id).unwrap();
    // The answer carrying the credentials is lost (the worker crashed, or timed out) after
    // the studio sent it: the studio answers the same credentials again (§1.2).
    f.studio.inject(
        Some(Route::Poll),
        Fault::LoseResponse(Duration::from_secs(2)),
        1,
    );
    transient(f.tick().await);
    assert!(matches!(
        RegistrationState::from_config(&f.home.on_disk()),
        RegistrationState::Pending { .. }
    ));
    assert_eq!(
        f.tick().await.unwrap(),
        RegistrationState::Approved {
            worker_id: worker_id.clone()
        }
    );
    assert_eq!(
        RegistrationState::from_config(&f.home.on_disk()),
        RegistrationState::Approved { worker_id }
    );
}

#[tokio::test]
async fn a_lost_create_response_does_not_leave_two_requests() {
    let f = Fixture::new().await;
    f.studio.inject(
        Some(Route::Register),
        Fault::LoseResponse(Duration::from_secs(2)),
        1,
    );
    transient(f.tick().await);
    assert_eq!(f.studio.requests().len(), 1, "the studio did create it");

    let request_id = f.pending().await;
    assert_eq!(
        f.studio.requests().len(),
        1,
        "the retry names the same install id and secret"
    );
    assert_eq!(f.studio.requests()[0].request_id, request_id);
}

#[tokio::test]
async fn only_the_studios_secret_check_decides() {
    // The poll proves possession of the secret: a worker whose secret was swapped on disk
    // is refused (403) and starts over instead of getting someone else's credentials.
    let f = Fixture::new().await;
    let request_id = f.pending().await;
    f.studio.approve(&request_id).unwrap();
    f.home
        .shared()
        .update(|c| {
            c.registration_secret = Some(studio_worker::secret::Secret::new("0".repeat(64)))
        })
        .unwrap();
    assert_eq!(f.tick().await.unwrap(), RegistrationState::Pristine);
    assert_eq!(f.home.on_disk().worker_id, None);
}

//! The headless runtime (all its tasks) against the in-process studio over real sockets.

use std::time::Duration;

use studio_worker::registration::RegistrationState;
use studio_worker::runtime::control::{self, ControlCommand};
use studio_worker::runtime::{Command, Runtime, RuntimeHandle};
use studio_worker::vocab::pause::PauseReason;

use crate::support::studio::{Decision, Fault, Route, TestStudio};
use crate::support::{PATIENCE, WorkerHome, eventually, fast_timing};

fn approved_worker_id(handle: &RuntimeHandle) -> Option<String> {
    match handle.status().registration {
        RegistrationState::Approved { worker_id } => Some(worker_id),
        _ => None,
    }
}

/// A studio that approves on the second poll, and a runtime that got approved and heartbeats.
async fn approved_and_heartbeating() -> (TestStudio, WorkerHome, Runtime, String) {
    let studio = TestStudio::start().await;
    studio.set_decision(Decision::ApproveAfterPolls(2));
    studio.set_next_heartbeat_s(Some(0)); // clamped up to the (fast) floor
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let runtime = home.start_runtime(fast_timing());
    let handle = runtime.handle();
    eventually("approved", PATIENCE, || {
        approved_worker_id(&handle).is_some()
    })
    .await;
    let worker_id = approved_worker_id(&handle).unwrap();
    eventually("two heartbeats", PATIENCE, || {
        studio
            .worker(&worker_id)
            .is_some_and(|w| w.heartbeats.len() >= 2)
    })
    .await;
    (studio, home, runtime, worker_id)
}

#[tokio::test]
async fn registers_then_heartbeats_with_its_token() {
    let (studio, home, runtime, worker_id) = approved_and_heartbeating().await;
    let handle = runtime.handle();

    let token = home.on_disk().auth_token.unwrap();
    let heartbeats = studio.log_for(Route::Heartbeat);
    assert!(!heartbeats.is_empty());
    for heartbeat in &heartbeats {
        assert_eq!(
            heartbeat.path,
            format!("/api/workers/{worker_id}/heartbeat")
        );
        assert_eq!(
            heartbeat.authorization,
            Some(format!("Bearer {}", token.expose()))
        );
        // No engine in this runtime: no model can be ready.
        assert_eq!(heartbeat.body["state"], "loading");
        assert_eq!(heartbeat.body["pausedReason"], serde_json::Value::Null);
        assert_eq!(
            heartbeat.body["capabilities"]["agentVersion"],
            env!("CARGO_PKG_VERSION")
        );
        assert!(heartbeat.body["stats"]["uptimeS"].is_u64());
    }
    // Nothing before approval carried a token.
    for request in studio.log().iter().filter(|r| r.route != Route::Heartbeat) {
        assert_eq!(request.authorization, None);
    }

    // The studio counted two heartbeats; the worker counts each once it read the answer.
    eventually("two heartbeats answered", PATIENCE, || {
        handle.status().connection.heartbeats_sent >= 2
    })
    .await;
    let status = handle.status();
    assert!(status.connection.last_heartbeat_at.is_some());
    assert_eq!(status.connection.last_error, None);
    assert_eq!(studio.count(Route::Register), 1);
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_studio_outage_is_survived_without_a_busy_loop() {
    let (studio, _home, runtime, worker_id) = approved_and_heartbeating().await;
    let handle = runtime.handle();

    studio.inject(Some(Route::Heartbeat), Fault::Status(503), u32::MAX);
    eventually("failures show in the status", PATIENCE, || {
        handle.status().connection.consecutive_failures >= 2
    })
    .await;
    let before = studio.count(Route::Heartbeat);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = studio.count(Route::Heartbeat) - before;
    // With a 20 ms → 200 ms backoff the expected rate is under ~12/s; a busy loop would be
    // thousands. (Production uses 1 s → 5 min: the same code, a slower clock.)
    assert!(during <= 30, "{during} heartbeats in 1.5 s of outage");
    assert!(handle.status().connection.last_error.is_some());

    studio.clear_faults();
    let good_before = studio.worker(&worker_id).unwrap().heartbeats.len();
    eventually("recovered", PATIENCE, || {
        studio.worker(&worker_id).unwrap().heartbeats.len() > good_before
            && handle.status().connection.consecutive_failures == 0
    })
    .await;
    assert_eq!(handle.status().connection.last_error, None);
    assert!(
        approved_worker_id(&handle).is_some(),
        "an outage never costs the registration"
    );
    runtime.shutdown().await;
}

#[tokio::test]
async fn retry_after_is_waited_out() {
    let (studio, _home, runtime, _worker_id) = approved_and_heartbeating().await;
    studio.inject(
        Some(Route::Heartbeat),
        Fault::RetryAfter {
            status: 429,
            seconds: 1,
        },
        1,
    );
    eventually("a heartbeat after the 429", PATIENCE, || {
        studio
            .log_for(Route::Heartbeat)
            .iter()
            .rev()
            .take(1)
            .any(|r| r.status == 200)
            && studio
                .log_for(Route::Heartbeat)
                .iter()
                .any(|r| r.status == 429)
    })
    .await;
    let heartbeats = studio.log_for(Route::Heartbeat);
    let refused = heartbeats.iter().position(|r| r.status == 429).unwrap();
    let gap = heartbeats[refused + 1].at - heartbeats[refused].at;
    assert!(
        gap >= Duration::from_millis(990),
        "retried after {gap:?}, asked for 1 s"
    );
    runtime.shutdown().await;
}

#[tokio::test]
async fn revocation_stops_the_worker_until_a_reset() {
    let (studio, home, runtime, worker_id) = approved_and_heartbeating().await;
    let handle = runtime.handle();

    studio.revoke(&worker_id);
    eventually("revoked", PATIENCE, || {
        matches!(
            handle.status().registration,
            RegistrationState::Revoked { .. }
        )
    })
    .await;
    assert!(
        home.on_disk().access_revoked,
        "revocation survives a restart"
    );
    let requests = studio.log().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        studio.log().len(),
        requests,
        "nothing is retried after a 401"
    );
    runtime.shutdown().await;

    // A restart stays revoked and silent.
    let runtime = home.start_runtime(fast_timing());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        runtime.handle().status().registration,
        RegistrationState::Revoked { .. }
    ));
    assert_eq!(studio.log().len(), requests);

    // The person resets: a fresh request, the old worker id is gone.
    assert!(runtime.handle().send(Command::ResetRegistration));
    eventually("a new request", PATIENCE, || {
        studio.count(Route::Register) == 2
    })
    .await;
    assert_eq!(home.on_disk().worker_id, None);
    runtime.shutdown().await;
}

#[tokio::test]
async fn the_studio_can_pause_and_resume_the_worker() {
    let (studio, home, runtime, worker_id) = approved_and_heartbeating().await;
    let handle = runtime.handle();

    studio.set_pause(&worker_id, true);
    eventually("paused by the studio", PATIENCE, || {
        handle.status().paused == Some(PauseReason::Studio)
    })
    .await;
    assert!(home.on_disk().pause.by_studio);
    eventually("a heartbeat reports it", PATIENCE, || {
        studio
            .worker(&worker_id)
            .unwrap()
            .heartbeats
            .iter()
            .any(|h| h["state"] == "paused" && h["pausedReason"] == "studio")
    })
    .await;

    studio.set_pause(&worker_id, false);
    eventually("resumed", PATIENCE, || handle.status().paused.is_none()).await;
    assert!(!home.on_disk().pause.by_studio);
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_users_pause_is_reported_at_once_and_survives_a_restart() {
    let studio = TestStudio::start().await;
    studio.set_decision(Decision::ApproveAfterPolls(1));
    studio.set_next_heartbeat_s(Some(3600)); // clamped to the cap: no regular heartbeat soon
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let mut timing = fast_timing();
    timing.heartbeat_cap = Duration::from_secs(60);
    let runtime = home.start_runtime(timing);
    let handle = runtime.handle();
    eventually("first heartbeat", PATIENCE, || {
        studio.count(Route::Heartbeat) == 1
    })
    .await;

    assert!(handle.send(Command::Pause));
    eventually("paused", PATIENCE, || {
        handle.status().paused == Some(PauseReason::User)
    })
    .await;
    eventually("told the studio without waiting a minute", PATIENCE, || {
        studio
            .log_for(Route::Heartbeat)
            .iter()
            .any(|h| h.body["state"] == "paused" && h.body["pausedReason"] == "user")
    })
    .await;
    runtime.shutdown().await;

    let runtime = home.start_runtime(timing);
    assert_eq!(runtime.handle().status().paused, Some(PauseReason::User));
    assert!(runtime.handle().send(Command::Resume));
    eventually("resumed", PATIENCE, || {
        runtime.handle().status().paused.is_none()
    })
    .await;
    assert!(!home.on_disk().pause.by_user);
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_users_resume_does_not_lift_the_studios_pause() {
    let (studio, _home, runtime, worker_id) = approved_and_heartbeating().await;
    let handle = runtime.handle();
    studio.set_pause(&worker_id, true);
    handle.send(Command::Pause);
    eventually("paused by user", PATIENCE, || {
        handle.status().paused == Some(PauseReason::User)
    })
    .await;
    handle.send(Command::Resume);
    eventually("still paused by studio", PATIENCE, || {
        handle.status().paused == Some(PauseReason::Studio)
    })
    .await;
    runtime.shutdown().await;
}

#[tokio::test]
async fn reset_registration_while_approved_asks_again() {
    let (studio, home, runtime, worker_id) = approved_and_heartbeating().await;
    let handle = runtime.handle();
    let install_id = home.on_disk().install_id;

    studio.set_decision(Decision::Manual);
    assert!(handle.send(Command::ResetRegistration));
    eventually("pending again", PATIENCE, || {
        matches!(
            handle.status().registration,
            RegistrationState::Pending { .. }
        )
    })
    .await;
    assert_eq!(studio.count(Route::Register), 2);
    assert_eq!(
        home.on_disk().install_id,
        install_id,
        "the install id is kept"
    );

    let heartbeats = studio.worker(&worker_id).unwrap().heartbeats.len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        studio.worker(&worker_id).unwrap().heartbeats.len(),
        heartbeats,
        "the old identity stops heartbeating"
    );
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_restart_while_pending_keeps_polling_the_same_request() {
    let studio = TestStudio::start().await;
    let home = WorkerHome::new();
    home.write_config(&studio.url());

    let runtime = home.start_runtime(fast_timing());
    eventually("polling", PATIENCE, || studio.count(Route::Poll) >= 2).await;
    runtime.shutdown().await;

    let runtime = home.start_runtime(fast_timing());
    let polls = studio.count(Route::Poll);
    eventually("polling again", PATIENCE, || {
        studio.count(Route::Poll) > polls + 1
    })
    .await;
    assert_eq!(
        studio.count(Route::Register),
        1,
        "the restart reused the request"
    );

    let request_id = studio.pending_request_ids().pop().unwrap();
    let worker_id = studio.approve(&request_id).unwrap();
    let handle = runtime.handle();
    eventually("approved", PATIENCE, || {
        approved_worker_id(&handle).as_deref() == Some(worker_id.as_str())
    })
    .await;
    eventually("heartbeating", PATIENCE, || {
        studio.count(Route::Heartbeat) >= 1
    })
    .await;
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_rejected_worker_waits_for_a_reset() {
    let studio = TestStudio::start().await;
    studio.set_decision(Decision::RejectAfterPolls(1, "not today".into()));
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let runtime = home.start_runtime(fast_timing());
    let handle = runtime.handle();

    eventually("rejected", PATIENCE, || {
        handle.status().registration
            == RegistrationState::Rejected {
                reason: "not today".into(),
            }
    })
    .await;
    let requests = studio.log().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(studio.log().len(), requests, "no polling after a rejection");

    studio.set_decision(Decision::Manual);
    handle.send(Command::ResetRegistration);
    eventually("asked again", PATIENCE, || {
        matches!(
            handle.status().registration,
            RegistrationState::Pending { .. }
        )
    })
    .await;
    runtime.shutdown().await;
}

#[tokio::test]
async fn registration_rides_out_a_studio_that_is_down_at_first() {
    let studio = TestStudio::start().await;
    studio.set_decision(Decision::ApproveAfterPolls(1));
    studio.inject(Some(Route::Register), Fault::Status(500), 3);
    studio.inject(Some(Route::Poll), Fault::Garbage, 2);
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let runtime = home.start_runtime(fast_timing());
    let handle = runtime.handle();

    eventually("approved despite the outage", PATIENCE, || {
        approved_worker_id(&handle).is_some()
    })
    .await;
    assert_eq!(
        studio.workers().len(),
        1,
        "one registration, however many retries"
    );
    let creates = studio.log_for(Route::Register);
    assert_eq!(creates.len(), 4, "three failures, then success");
    assert!(
        creates
            .iter()
            .all(|c| c.body["registrationSecretHash"] == creates[0].body["registrationSecretHash"]),
        "every retry names the same secret"
    );
    assert_eq!(handle.status().registration_problem, None);
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_show_request_from_another_launch_reaches_the_window() {
    let studio = TestStudio::start().await;
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let runtime = home.start_runtime(fast_timing());
    let handle = runtime.handle();
    let control_file = home.dir.path().join("control.json");
    eventually("control channel", PATIENCE, || control_file.exists()).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&control_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "its token must not be readable by other users");
    }

    control::send(home.dir.path(), &ControlCommand::Show)
        .await
        .unwrap();
    eventually("raise requested", PATIENCE, || {
        handle.requests().window_raises() == 1
    })
    .await;
    runtime.shutdown().await;
    assert!(matches!(
        control::send(home.dir.path(), &ControlCommand::Show).await,
        Err(control::ControlError::NotRunning)
    ));
    assert!(
        !control_file.exists(),
        "the control file goes with the worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_starts_with_a_broken_studio_url_and_says_why_while_headless_refuses() {
    use studio_worker::runtime::RuntimeOptions;

    let home = WorkerHome::new();
    // Plain http to a non-loopback host is refused (the token would cross a network in
    // clear text).
    home.write_config("http://studio.example.com/api");
    let options = |tolerate: bool| RuntimeOptions {
        timing: fast_timing(),
        data_dir: home.dir.path().to_path_buf(),
        api_base_override: None,
        engine: None,
        recovered_config: None,
        model_supply: None,
        probes: None,
        tolerate_invalid_studio_url: tolerate,
        gpu_recovery: Default::default(),
    };

    let refused = Runtime::start(home.shared(), options(false));
    assert!(refused.is_err(), "headless runs fail on a bad URL");

    let runtime = Runtime::start(home.shared(), options(true)).expect("the app starts anyway");
    let handle = runtime.handle();
    let problem = handle
        .status()
        .studio_url_problem
        .expect("the problem is shown");
    assert!(
        problem.contains("not valid") && problem.contains("Settings"),
        "{problem}"
    );
    assert_eq!(
        handle.status().api_base_url,
        "http://studio.example.com/api"
    );
    // Nothing talks to a studio: registration never starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(matches!(
        handle.status().registration,
        RegistrationState::Pristine
    ));
    assert!(handle.config().snapshot().install_id.is_none());
    runtime.shutdown().await;
}

#[tokio::test]
async fn settings_that_cannot_be_applied_are_reported_not_claimed_as_saved() {
    let studio = TestStudio::start().await;
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let runtime = home.start_runtime(fast_timing());
    let handle = runtime.handle();
    let before = handle.config().snapshot();
    let change = |api_base_url: &str| studio_worker::runtime::SettingsChange {
        api_base_url: api_base_url.to_owned(),
        worker_name: "renamed-rig".to_owned(),
        unload_when_paused: before.engine.unload_when_paused,
        device: before.engine.device,
        enabled_models: before.models.enabled.clone(),
        close_to_tray: before.ui.close_to_tray,
        start_at_login: studio_worker::platform::autostart::is_enabled(),
        save_copies_to: None,
        send_crash_reports: false,
        policy: before.policy.clone(),
    };

    // A command from elsewhere than the window (which checks first) with a URL that would
    // send the token in clear text: nothing is saved, and the person is told.
    assert!(handle.send(Command::SaveSettings(change(
        "http://studio.example.com/api"
    ))));
    eventually("the problem is shown", PATIENCE, || {
        handle.status().settings_problem.is_some()
    })
    .await;
    let problem = handle.status().settings_problem.unwrap();
    assert!(problem.contains("not saved"), "{problem}");
    assert_eq!(home.on_disk().worker_name, "test-rig", "nothing saved");

    // A good one clears the problem.
    assert!(handle.send(Command::SaveSettings(change(&studio.url()))));
    eventually("saved", PATIENCE, || {
        handle.status().settings_problem.is_none() && home.on_disk().worker_name == "renamed-rig"
    })
    .await;
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_revocation_holds_even_when_the_settings_cannot_be_saved() {
    let (studio, home, runtime, worker_id) = approved_and_heartbeating().await;
    let handle = runtime.handle();
    home.block_settings_saves();

    studio.revoke(&worker_id);
    eventually("revoked in memory", PATIENCE, || {
        matches!(
            handle.status().registration,
            RegistrationState::Revoked { .. }
        )
    })
    .await;
    eventually("the person is told it is not saved", PATIENCE, || {
        handle.status().settings_unsaved.is_some()
    })
    .await;
    // Before: the failed save left memory approved, and every loop went on asking with a
    // token the studio refuses.
    let requests = studio.log().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(studio.log().len(), requests, "all traffic stopped");
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_pause_holds_even_when_it_cannot_be_saved_and_is_saved_once_it_can() {
    let (studio, home, runtime, worker_id) = approved_and_heartbeating().await;
    let handle = runtime.handle();
    home.block_settings_saves();

    assert!(handle.send(Command::Pause));
    eventually("paused", PATIENCE, || {
        handle.status().paused == Some(PauseReason::User)
    })
    .await;
    eventually("the studio hears it", PATIENCE, || {
        studio
            .worker(&worker_id)
            .unwrap()
            .heartbeats
            .iter()
            .any(|h| h["state"] == "paused" && h["pausedReason"] == "user")
    })
    .await;
    let unsaved = handle.status().settings_unsaved.expect("said unsaved");
    assert!(!unsaved.is_empty());
    // The command's own report says the same, not "failed".
    let problem = handle.status().settings_problem.unwrap_or_default();
    assert!(problem.contains("holds until"), "{problem}");

    // The disk is back: the next change saves everything memory holds, pause included.
    std::fs::remove_dir_all(home.config_path()).unwrap();
    assert!(handle.send(Command::CloseHintShown));
    eventually("saved at last", PATIENCE, || {
        handle.status().settings_unsaved.is_none()
    })
    .await;
    let on_disk = home.on_disk();
    assert!(on_disk.pause.by_user, "the pause reached the disk");
    assert!(on_disk.ui.close_hint_shown);
    runtime.shutdown().await;
}

//! Crash reports with the real binary: `crash-test` panics with the worker's token and its
//! settings path in the message; a local HTTP endpoint stands in for the Sentry collector.
//! Without consent nothing is sent; with it, one scrubbed event arrives. Either way the
//! scrubbed panic is in the local log and on stderr.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;

use studio_worker::config::{self, Config};
use studio_worker::secret::Secret;

use crate::support::WorkerHome;

const TOKEN: &str = "tok_crashcrashcrashcrash0123456789";
const HUB_TOKEN: &str = "hf_hubhubhubhubhub0123456789";

/// Envelopes the fake collector received.
type Received = Arc<Mutex<Vec<String>>>;

async fn collector() -> (String, Received) {
    let received = Received::default();
    let app = Router::new()
        .route(
            "/api/{project}/envelope/",
            post(|State(received): State<Received>, body: Bytes| async move {
                received
                    .lock()
                    .expect("lock")
                    .push(String::from_utf8_lossy(&body).into_owned());
                "{}"
            }),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://publickey@{addr}/42"), received)
}

/// Runs `crash-test` on a blocking thread, so the collector keeps answering meanwhile.
async fn crash_off_the_runtime(home: &WorkerHome, dsn: String) -> Output {
    let config_path = home.config_path();
    let home_path = home.dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_studio-worker"))
            .arg("--config")
            .arg(config_path)
            .arg("crash-test")
            .env("STUDIO_WORKER_CRASH_DSN", dsn)
            // The home folder the scrubber must hide.
            .env("HOME", home_path)
            // The older name of the Hugging Face token variable, which the hub client reads.
            .env_remove("HF_TOKEN")
            .env("HUGGING_FACE_HUB_TOKEN", HUB_TOKEN)
            .env_remove("RUST_LOG")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .output()
            .expect("run crash-test")
    })
    .await
    .expect("join")
}

fn write_config(home: &WorkerHome, send: bool) {
    let mut config = Config {
        worker_id: Some("w_7".into()),
        auth_token: Some(Secret::new(TOKEN)),
        ..Config::default()
    };
    config.crash_reports.send = send;
    config::save(&home.config_path(), &config).expect("save");
}

fn log_text(folder: &Path) -> String {
    let mut text = String::new();
    for entry in walk(folder) {
        if entry.extension().is_some_and(|ext| ext == "log") {
            text.push_str(&std::fs::read_to_string(&entry).unwrap_or_default());
        }
    }
    text
}

fn walk(folder: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn assert_scrubbed(what: &str, text: &str, home: &WorkerHome) {
    assert!(!text.contains(TOKEN), "{what} shows the token: {text}");
    assert!(
        !text.contains(HUB_TOKEN),
        "{what} shows the hub token: {text}"
    );
    let home_path = home.dir.path().to_string_lossy();
    assert!(
        !text.contains(home_path.as_ref()),
        "{what} shows the home folder: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_consent_a_crash_is_only_logged_scrubbed() {
    let (dsn, received) = collector().await;
    let home = WorkerHome::new();
    write_config(&home, false);

    let out = crash_off_the_runtime(&home, dsn).await;
    assert_eq!(out.status.code(), Some(101), "a panic's exit code");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "crash test: token [secret], settings in ~{}",
            std::path::MAIN_SEPARATOR
        )),
        "{stderr}"
    );
    assert!(stderr.contains("hub token [secret]"), "{stderr}");
    assert_scrubbed("stderr", &stderr, &home);
    let log = log_text(home.dir.path());
    assert!(
        log.contains("crash test: token [secret]"),
        "in the log: {log}"
    );
    assert_scrubbed("the log", &log, &home);

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        received.lock().expect("lock").is_empty(),
        "nothing is sent without consent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_consent_one_scrubbed_report_reaches_the_collector() {
    let (dsn, received) = collector().await;
    let home = WorkerHome::new();
    write_config(&home, true);

    let out = crash_off_the_runtime(&home, dsn).await;
    assert_eq!(out.status.code(), Some(101));

    let envelopes = received.lock().expect("lock").clone();
    assert_eq!(envelopes.len(), 1, "one report: {envelopes:?}");
    let report = &envelopes[0];
    assert!(report.contains("crash test: token [secret]"), "{report}");
    assert!(report.contains("\"type\":\"panic\""), "{report}");
    assert_scrubbed("the report", report, &home);
    assert!(!report.contains("server_name"), "no host name: {report}");

    let log = log_text(home.dir.path());
    assert!(
        log.contains("crash test: token [secret]"),
        "also in the log: {log}"
    );
}

//! The real `studio-worker` binary as a child process: subcommands, exit codes, and a run
//! against the in-process studio that is killed between every step.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use studio_worker::config::{self, Config};
use studio_worker::registration::RegistrationState;
use studio_worker::secret::Secret;

use crate::support::files::copy_folder;
use crate::support::studio::{Route, TestStudio};
use crate::support::{WorkerHome, eventually};

const TOKEN: &str = "tok_abcdefghijklmnopqrstuvwxyz0123";

fn worker(config: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_studio-worker"));
    command.arg("--config").arg(config).env_remove("RUST_LOG");
    // Never the real hub: a worker run would start downloading the default model. Port 9
    // (discard) on loopback refuses at once; the cache stays beside the config.
    let folder = config.parent().unwrap_or(config);
    command
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HUB_CACHE", folder.join("hf-cache"))
        .env_remove("HF_TOKEN");
    command
}

fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .expect("run studio-worker")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The row of `models list --json` for `model_id`.
fn listed_model<'a>(rows: &'a serde_json::Value, model_id: &str) -> &'a serde_json::Value {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|row| row["id"] == model_id)
        .unwrap_or_else(|| panic!("no row for {model_id}: {rows}"))
}

fn approved_config(home: &WorkerHome) -> Config {
    let config = Config {
        install_id: Some("7d0c5a04-0c1e-4a36-9a43-8f3e2c1d5b6a".into()),
        worker_id: Some("w_42".into()),
        auth_token: Some(Secret::new(TOKEN)),
        worker_name: "rig".into(),
        ..Config::default()
    };
    config::save(&home.config_path(), &config).unwrap();
    config
}

#[test]
fn version_help_and_usage_errors() {
    let home = WorkerHome::new();
    let version = run(worker(&home.config_path()).arg("--version"));
    assert!(version.status.success());
    assert_eq!(
        text(&version.stdout).trim(),
        concat!("studio-worker ", env!("CARGO_PKG_VERSION"))
    );

    let help = run(worker(&home.config_path()).arg("--help"));
    assert!(help.status.success());
    for subcommand in ["run", "register", "status"] {
        assert!(
            text(&help.stdout).contains(subcommand),
            "{subcommand} in --help"
        );
    }

    let bad = run(worker(&home.config_path()).arg("frobnicate"));
    assert_eq!(bad.status.code(), Some(2), "usage errors exit 2");
    let bad_flag = run(worker(&home.config_path()).args(["status", "--jsn"]));
    assert_eq!(bad_flag.status.code(), Some(2));
}

#[test]
fn status_shows_the_token_masked() {
    let home = WorkerHome::new();
    approved_config(&home);

    let human = run(worker(&home.config_path()).arg("status"));
    assert!(human.status.success(), "{}", text(&human.stderr));
    let out = text(&human.stdout);
    assert!(out.contains("approved as w_42"), "{out}");
    assert!(out.contains("tok_…0123"), "{out}");
    assert!(out.contains("not running"), "{out}");
    assert!(!out.contains(TOKEN), "the token is never printed whole");

    let json = run(worker(&home.config_path()).args(["status", "--json"]));
    assert!(json.status.success());
    let out = text(&json.stdout);
    assert!(!out.contains(TOKEN));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["registration"]["state"], "approved");
    assert_eq!(report["workerId"], "w_42");
    assert_eq!(report["authToken"], "tok_…0123");
    assert_eq!(
        report["configPath"],
        home.config_path().to_string_lossy().as_ref()
    );
    assert_eq!(report["running"], serde_json::Value::Null);
}

#[test]
fn status_and_models_list_report_a_broken_file_without_moving_it() {
    let home = WorkerHome::new();
    std::fs::write(home.config_path(), format!("auth_token = \"{TOKEN}\"\n[[[")).unwrap();
    for command in [&["status"][..], &["models", "list"]] {
        let out = run(worker(&home.config_path())
            .args(command)
            .env("HF_HUB_CACHE", home.dir.path().join("hub")));
        assert_eq!(out.status.code(), Some(1), "{command:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains("is not valid settings"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(!stderr.contains(TOKEN));
        assert!(home.config_path().exists(), "{command:?} only reads");
    }
}

#[test]
fn register_reset_forgets_the_studio_side_only() {
    let home = WorkerHome::new();
    let mut before = approved_config(&home);
    before.pause.by_user = true;
    config::save(&home.config_path(), &before).unwrap();

    let out = run(worker(&home.config_path()).args(["register", "--reset"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("Forgot worker w_42 and its access token"),
        "{said}"
    );
    assert!(
        said.contains("Kept install id 7d0c5a04-0c1e-4a36-9a43-8f3e2c1d5b6a"),
        "{said}"
    );
    assert!(!said.contains(TOKEN));

    let after = home.on_disk();
    assert_eq!(
        RegistrationState::from_config(&after),
        RegistrationState::Pristine
    );
    assert_eq!(after.auth_token, None);
    assert_eq!(after.install_id, before.install_id);
    assert_eq!(after.worker_name, "rig");
    assert!(after.pause.by_user, "other settings are kept");

    let again = run(worker(&home.config_path()).args(["register", "--reset"]));
    assert!(again.status.success());
    assert!(text(&again.stdout).contains("no registration to forget"));
}

#[test]
fn plain_http_to_another_host_is_refused_at_start() {
    let home = WorkerHome::new();
    home.write_config("http://studio.example.com/api");
    let out = run(worker(&home.config_path()).args(["run", "--headless"]));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(last.starts_with("studio-worker: "), "{stderr}");
    assert!(last.contains("plain http"), "{stderr}");

    // The same through the flag, which must not bypass the check.
    let home = WorkerHome::new();
    let out = run(worker(&home.config_path()).args([
        "run",
        "--headless",
        "--api-url",
        "http://10.1.2.3/api",
    ]));
    assert_eq!(out.status.code(), Some(1));
}

/// A running worker, killed (SIGKILL) when dropped.
struct Running(Child);

impl Running {
    fn start(config: &Path) -> Self {
        Self::spawn(worker(config))
    }

    /// `command` (a [`worker`] with its environment) as `run --headless`.
    fn spawn(mut command: Command) -> Self {
        let child = command
            .args(["run", "--headless"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the worker");
        Self(child)
    }

    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SLOW: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_at_start_is_kept_and_the_worker_goes_on() {
    let studio = TestStudio::start().await;
    let home = WorkerHome::new();
    let original = format!(
        "api_base_url = \"{}\"\nauth_token = \"{TOKEN}\"\nworker_id = \n",
        studio.url()
    );
    std::fs::write(home.config_path(), &original).unwrap();

    // The broken file named the test studio, but the defaults do not: point the run at it.
    let mut child = worker(&home.config_path())
        .args(["run", "--headless", "--api-url", &studio.url()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("a registration request from defaults", SLOW, || {
        studio.count(Route::Register) == 1
    })
    .await;
    let status_path = home.dir.path().join("status.json");
    eventually("the status file", SLOW, || status_path.exists()).await;
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    assert!(stderr.contains("could not be read"), "{stderr}");
    assert!(stderr.contains("config.toml.broken-"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "{stderr}");

    // The running worker's status says so too (what `status` and the window show).
    let kept_status =
        studio_worker::runtime::status_file::read(&home.dir.path().join("status.json"))
            .expect("status file written");
    let notice = kept_status
        .status
        .settings_recovered
        .expect("the recovery is reported");
    assert!(
        notice.contains("config.toml.broken-") && notice.contains("line 3"),
        "{notice}"
    );
    assert!(!notice.contains(TOKEN));

    let kept: Vec<_> = std::fs::read_dir(home.dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("config.toml.broken-")
        })
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(std::fs::read_to_string(kept[0].path()).unwrap(), original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_again_for_a_lost_gpu_says_so_in_status() {
    let studio = TestStudio::start().await;
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    // What a worker whose GPU stopped working gives the one it starts.
    let two_minutes_ago = chrono::Utc::now().timestamp() - 120;
    let mut child = worker(&home.config_path())
        .args(["run", "--headless"])
        .env(
            studio_worker::runtime::gpu_recovery::VARIABLE,
            format!(
                "1:{two_minutes_ago}:the launch timed out and was terminated \
                 (CUDA_ERROR_LAUNCH_TIMEOUT)"
            ),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status_path = home.dir.path().join("status.json");
    eventually("the status file", SLOW, || status_path.exists()).await;

    let output = worker(&home.config_path()).arg("status").output().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains(
            "GPU:          Started again 2 min ago: the GPU stopped working (the launch timed \
             out and was terminated (CUDA_ERROR_LAUNCH_TIMEOUT))\n"
        ),
        "{stdout}"
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_run_survives_being_killed_between_every_step() {
    let studio = TestStudio::start().await;
    studio.set_poll_after_s(Some(1));
    studio.set_next_heartbeat_s(Some(5));
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let config_path = home.config_path();

    // Pristine → Pending, then killed.
    let worker_process = Running::start(&config_path);
    eventually("a registration request", SLOW, || {
        studio.count(Route::Register) == 1
    })
    .await;
    eventually("the request id saved", SLOW, || {
        matches!(
            RegistrationState::from_config(&home.on_disk()),
            RegistrationState::Pending { .. }
        )
    })
    .await;
    worker_process.kill();

    // Restarted while pending: polls the same request.
    let polls = studio.count(Route::Poll);
    let worker_process = Running::start(&config_path);
    eventually("polling again after the restart", SLOW, || {
        studio.count(Route::Poll) > polls
    })
    .await;
    assert_eq!(studio.count(Route::Register), 1);

    // The operator approves: heartbeats follow.
    let request_id = studio.pending_request_ids().pop().unwrap();
    let worker_id = studio.approve(&request_id).unwrap();
    eventually("a heartbeat", SLOW, || studio.count(Route::Heartbeat) >= 1).await;

    // `status --json` from another process sees the running worker and its heartbeat.
    let mut report = serde_json::Value::Null;
    eventually("status shows the heartbeat", SLOW, || {
        let out = run(worker(&config_path).args(["status", "--json"]));
        report = serde_json::from_slice(&out.stdout).unwrap_or_default();
        !report["running"]["status"]["connection"]["lastHeartbeatAt"].is_null()
    })
    .await;
    assert_eq!(report["registration"]["state"], "approved");
    assert_eq!(report["workerId"], worker_id.as_str());
    assert_eq!(report["running"]["pid"], worker_process.0.id());

    // Killed while approved, restarted: the same identity goes on heartbeating.
    worker_process.kill();
    let heartbeats = studio.count(Route::Heartbeat);
    let mut worker_process = Running::start(&config_path);
    eventually("heartbeating after the restart", SLOW, || {
        studio.count(Route::Heartbeat) > heartbeats
    })
    .await;
    assert_eq!(studio.workers().len(), 1);
    assert_eq!(studio.count(Route::Register), 1);

    // SIGTERM: a clean exit, and the status file says so.
    let terminated = Command::new("kill")
        .args(["-TERM", &worker_process.0.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let exit = worker_process.0.wait().unwrap();
    assert!(exit.success(), "SIGTERM exits cleanly: {exit:?}");
    let out = run(worker(&config_path).arg("status"));
    assert!(
        text(&out.stdout).contains("not running"),
        "{}",
        text(&out.stdout)
    );

    // Nothing secret in the log file.
    let token = home.on_disk().auth_token.unwrap();
    let mut logged = String::new();
    for entry in std::fs::read_dir(home.dir.path().join("logs")).unwrap() {
        logged.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    assert!(logged.contains("the studio approved this PC"), "{logged}");
    assert!(
        !logged.contains(token.expose()),
        "the token is never logged"
    );
    let secret_hash = studio.log_for(Route::Register)[0].body["registrationSecretHash"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!logged.contains(&secret_hash), "not even the secret's hash");
}

// Windows and macOS always have a display: there the app opens its window (and turns on
// start at login for the account running the tests).
#[cfg(not(any(target_os = "windows", target_os = "macos")))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_display_the_app_runs_headless() {
    let studio = TestStudio::start().await;
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    // `studio-worker` with no command is the desktop app; with no display it says so and
    // carries on as the headless worker, so the README's run command works on a server.
    let mut child = worker(&home.config_path())
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("a registration request", SLOW, || {
        studio.count(Route::Register) == 1
    })
    .await;
    child.kill().unwrap();
    let stderr = text(&child.wait_with_output().unwrap().stderr);
    assert!(
        stderr.contains("no display found; running without a window"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_for_the_same_folder_is_refused() {
    let studio = TestStudio::start().await;
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let first = Running::start(&home.config_path());
    eventually("the first worker is up", SLOW, || {
        studio.count(Route::Register) == 1
    })
    .await;

    let second = run(worker(&home.config_path()).args(["run", "--headless"]));
    assert_eq!(second.status.code(), Some(1));
    let stderr = text(&second.stderr);
    assert!(stderr.contains("a worker is already running"), "{stderr}");
    assert_eq!(
        studio.count(Route::Register),
        1,
        "the second one did nothing"
    );

    // Once the first is gone (even killed), the lock is free again.
    first.kill();
    let _third = Running::start(&home.config_path());
    eventually("a new worker polls", SLOW, || {
        studio.count(Route::Poll) >= 1
    })
    .await;
}

#[test]
fn pause_and_resume_without_a_running_worker_set_the_saved_state() {
    let home = WorkerHome::new();
    home.write_config("https://studio.example.com/api");
    let paused = run(worker(&home.config_path()).arg("pause"));
    assert!(paused.status.success(), "{}", text(&paused.stderr));
    assert!(text(&paused.stdout).contains("it will start paused"));
    assert!(home.on_disk().pause.by_user);

    let resumed = run(worker(&home.config_path()).arg("resume"));
    assert!(resumed.status.success());
    assert!(!home.on_disk().pause.by_user);
}

fn tiny_fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

#[test]
fn generate_writes_a_png_with_its_parameters_and_refuses_bad_arguments() {
    let home = WorkerHome::new();
    let out = home.dir.path().join("fox.png");
    let model = tiny_fixture("tiny-sd1");
    let generate_with = |extra: &[&str], prompt_cache: &str| {
        let mut command = worker(&home.config_path());
        command
            .args(["generate", "--prompt", "a red fox", "--model-dir"])
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .env("STUDIO_WORKER_PROMPT_CACHE", prompt_cache);
        run(&mut command)
    };
    let generate = |extra: &[&str]| generate_with(extra, "on");

    let refused = generate(&["--scheduler", "plms"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("unknown scheduler"));
    let refused = generate(&["--width", "100"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(text(&refused.stderr).contains("--width must be a multiple of 8"));
    assert!(!out.exists(), "nothing written for bad arguments");

    let made = generate(&[
        "--seed", "77", "--steps", "2", "--width", "64", "--height", "48",
    ]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    assert!(text(&made.stdout).contains("seed: 77"));
    let png = std::fs::read(&out).unwrap();
    let image = image::load_from_memory(&png).unwrap();
    assert_eq!((image.width(), image.height()), (64, 48));
    let parameters = studio_worker::image_file::read_parameters(&png).expect("a parameters chunk");
    assert!(parameters.starts_with("a red fox\n"), "{parameters}");
    assert!(
        parameters.contains("Steps: 2") && parameters.contains("Seed: 77"),
        "{parameters}"
    );

    // The same seed gives the same image, each time of a repeated and profiled run (the
    // bench's warm timings and profile come from these lines; it encodes every run's
    // prompts, as diffusers does).
    let repeated_and_profiled = [
        "--seed",
        "77",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "48",
        "--repeat",
        "2",
        "--profile",
    ];
    let again = generate_with(&repeated_and_profiled, "0");
    assert!(again.status.success(), "{}", text(&again.stderr));
    let timings = text(&again.stderr);
    assert!(
        timings.contains("run 1/2: done in") && timings.contains("run 2/2: done in"),
        "{timings}"
    );
    // The last run's profile only, naming the work a UNet and a VAE are made of.
    assert_eq!(timings.matches("time went").count(), 1, "{timings}");
    let profile = &timings[timings.find("where run 2's time went").expect(&timings)..];
    for work in [
        "UNet conv 3×3",
        "VAE conv 3×3",
        "UNet group norm (+ SiLU)",
        "UNet attention: scores, softmax, values",
        "UNet linear",
        "text encoder",
        "sampler step",
        "everything else",
    ] {
        assert!(profile.contains(work), "{work} missing from:\n{profile}");
    }
    let second = image::load_from_memory(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(image.to_rgb8(), second.to_rgb8());

    // With the pipeline's kept encodings, the second run takes the prompts from them: the
    // same image, and no text encoder in its time.
    let kept = generate(&repeated_and_profiled);
    assert!(kept.status.success(), "{}", text(&kept.stderr));
    let timings = text(&kept.stderr);
    let profile = &timings[timings.find("where run 2's time went").expect(&timings)..];
    assert!(profile.contains("UNet conv 3×3"), "{profile}");
    assert!(!profile.contains("text encoder"), "{profile}");
    let third = image::load_from_memory(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(image.to_rgb8(), third.to_rgb8());
}

#[test]
fn models_add_checks_the_folder_tensor_by_tensor_before_serving_it() {
    let home = WorkerHome::new();
    let broken = home.dir.path().join("broken-model");
    copy_folder(&tiny_fixture("tiny-sd1"), &broken);
    // An architecture the weights do not have: more layers per block.
    let config_path = broken.join("unet/config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace("\"layers_per_block\": 1", "\"layers_per_block\": 2"),
    )
    .unwrap();
    let refused = run(worker(&home.config_path())
        .args(["models", "add", "--id", "mine"])
        .arg(&broken));
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("no tensor"),
        "{}",
        text(&refused.stderr)
    );

    let refused = run(worker(&home.config_path())
        .args(["models", "add", "--id", "sd-turbo"])
        .arg(tiny_fixture("tiny-sd1")));
    assert_eq!(refused.status.code(), Some(2), "a catalog id is refused");

    let added = run(worker(&home.config_path())
        .args(["models", "add", "--id", "mine"])
        .arg(tiny_fixture("tiny-sd1")));
    assert!(added.status.success(), "{}", text(&added.stderr));
    assert!(home.on_disk().models.local.contains_key("mine"));
    let listed = run(worker(&home.config_path())
        .args(["models", "list", "--json"])
        .env("HF_HUB_CACHE", home.dir.path().join("hub")));
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let mine = listed_model(&rows, "mine");
    assert_eq!(mine["state"], "local");
    let turbo = listed_model(&rows, "sd-turbo");
    assert_eq!(turbo["state"], "not downloaded");
    assert!(turbo["size_bytes"].as_u64().unwrap() > 2_000_000_000);

    // Removed again (no worker runs): left out of the settings, its files where they were.
    let removed = run(worker(&home.config_path()).args(["models", "remove", "mine"]));
    assert!(removed.status.success(), "{}", text(&removed.stderr));
    assert!(
        text(&removed.stdout).contains("Stopped serving mine"),
        "{}",
        text(&removed.stdout)
    );
    assert!(home.on_disk().models.local.is_empty());
    assert!(tiny_fixture("tiny-sd1").join("model_index.json").exists());
    let unknown = run(worker(&home.config_path()).args(["models", "remove", "mine"]));
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown.stderr));
    assert!(
        text(&unknown.stderr).contains("no catalog model or model folder is called \"mine\""),
        "{}",
        text(&unknown.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_pull_shows_progress_and_the_model_is_then_ready_and_verified() {
    let hub = crate::support::hub::TestHub::start().await;
    let pinned = studio_worker::models::catalog::find("sd-turbo")
        .unwrap()
        .revision;
    hub.publish_folder_at("stabilityai/sd-turbo", &tiny_fixture("tiny-sd1"), pinned);
    let home = WorkerHome::new();
    let cache = home.dir.path().join("hub");
    let models = |args: &[&str]| {
        let mut command = worker(&home.config_path());
        command
            .arg("models")
            .args(args)
            .env("HF_ENDPOINT", hub.endpoint())
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_TOKEN");
        run(&mut command)
    };
    let pulled = tokio::task::block_in_place(|| models(&["pull", "sd-turbo"]));
    let stderr = text(&pulled.stderr);
    assert!(pulled.status.success(), "{stderr}");
    assert!(stderr.contains("100.0%"), "{stderr}");
    assert!(text(&pulled.stdout).contains("sd-turbo is ready"));
    let listed = tokio::task::block_in_place(|| models(&["list"]));
    let listing = text(&listed.stdout);
    let row = listing
        .lines()
        .find(|line| line.starts_with("sd-turbo"))
        .unwrap();
    assert!(row.contains("ready"), "{listing}");
    let verified = tokio::task::block_in_place(|| models(&["verify", "sd-turbo"]));
    assert!(verified.status.success(), "{}", text(&verified.stderr));
    let unknown = tokio::task::block_in_place(|| models(&["pull", "sd-9"]));
    assert_eq!(unknown.status.code(), Some(2));
    let removed = tokio::task::block_in_place(|| models(&["remove", "sd-turbo"]));
    assert!(removed.status.success());
    let said = text(&removed.stdout);
    assert!(said.contains("freed"), "{said}");
    // Enabled by default: the worker would fetch it again, and the person is told how not to.
    assert!(
        said.contains("sd-turbo is still enabled, so the worker downloads it again"),
        "{said}"
    );
    let listed = tokio::task::block_in_place(|| models(&["list", "--json"]));
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let turbo = listed_model(&rows, "sd-turbo");
    assert_eq!(turbo["state"], "not downloaded", "{rows}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_remove_goes_through_the_running_worker() {
    // The worker downloads sd-turbo (enabled by default; the tiny fixture under its name)
    // and serves it; `models remove` then has it untick, stop serving and delete the model.
    let hub = crate::support::hub::TestHub::start().await;
    let pinned = studio_worker::models::catalog::find("sd-turbo")
        .unwrap()
        .revision;
    hub.publish_folder_at("stabilityai/sd-turbo", &tiny_fixture("tiny-sd1"), pinned);
    let studio = TestStudio::start().await;
    studio.set_decision(crate::support::studio::Decision::ApproveAfterPolls(1));
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let cache = home.dir.path().join("hub");
    let with_hub = |mut command: Command| {
        command
            .env("HF_ENDPOINT", hub.endpoint())
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_TOKEN");
        command
    };
    let advertised = || {
        studio
            .workers()
            .iter()
            .find_map(|worker| worker.heartbeats.last().cloned())
            .map(|beat| beat["capabilities"]["models"].clone())
    };
    let running = Running::spawn(with_hub(worker(&home.config_path())));
    eventually("downloaded and served", SLOW, || {
        advertised() == Some(serde_json::json!([{ "id": "sd-turbo", "ready": true }]))
    })
    .await;

    let removed = tokio::task::block_in_place(|| {
        let mut command = with_hub(worker(&home.config_path()));
        run(command.args(["models", "remove", "sd-turbo"]))
    });
    let said = text(&removed.stdout);
    assert!(removed.status.success(), "{said}{}", text(&removed.stderr));
    assert!(
        said.starts_with("Removed sd-turbo (") && said.contains("unticked in Settings"),
        "{said}"
    );
    // Unticked in the settings the worker owns, no longer advertised, and gone from disk.
    assert!(home.on_disk().models.enabled.is_empty());
    eventually("no longer advertised", SLOW, || {
        advertised() == Some(serde_json::json!([]))
    })
    .await;
    let listed = tokio::task::block_in_place(|| {
        let mut command = with_hub(worker(&home.config_path()));
        run(command.args(["models", "list", "--json"]))
    });
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed_model(&rows, "sd-turbo")["state"], "not downloaded");
    running.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_stops_the_running_worker_and_waits_for_it() {
    let home = WorkerHome::new();
    let nothing = run(worker(&home.config_path()).arg("quit"));
    assert!(nothing.status.success(), "{}", text(&nothing.stderr));
    assert!(text(&nothing.stdout).contains("No worker is running"));

    let studio = TestStudio::start().await;
    studio.set_decision(crate::support::studio::Decision::ApproveAfterPolls(1));
    home.write_config(&studio.url());
    let mut worker_process = Running::start(&home.config_path());
    eventually("a heartbeat", SLOW, || studio.count(Route::Heartbeat) >= 1).await;
    eventually("the control channel", SLOW, || {
        home.config_path()
            .parent()
            .is_some_and(|folder| folder.join("control.json").exists())
    })
    .await;

    let quit = run(worker(&home.config_path()).args(["quit", "--wait", "30"]));
    assert!(quit.status.success(), "{}", text(&quit.stderr));
    assert!(text(&quit.stdout).contains("The worker has quit."));
    let exit = worker_process.0.try_wait().expect("wait");
    assert_eq!(
        exit.and_then(|status| status.code()),
        Some(0),
        "gone, and cleanly, by the time quit returns"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_changed_from_the_terminal_reach_the_running_worker_and_survive_its_saves() {
    let studio = TestStudio::start().await;
    studio.set_decision(crate::support::studio::Decision::ApproveAfterPolls(1));
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    let runtime = home.start_runtime(crate::support::fast_timing());
    let handle = runtime.handle();
    eventually("approved", SLOW, || {
        matches!(
            handle.status().registration,
            RegistrationState::Approved { .. }
        )
    })
    .await;
    eventually("the control channel", SLOW, || {
        home.dir.path().join("control.json").exists()
    })
    .await;

    // `models add` while the worker runs: the worker adds it (and says it serves it now).
    let added = tokio::task::block_in_place(|| {
        run(worker(&home.config_path())
            .args(["models", "add", "--id", "mine"])
            .arg(tiny_fixture("tiny-sd1")))
    });
    assert!(added.status.success(), "{}", text(&added.stderr));
    assert!(text(&added.stdout).contains("the running worker serves it now"));
    assert!(handle.config().snapshot().models.local.contains_key("mine"));

    // The worker saves a change of its own: the model stays. (When the terminal wrote
    // config.toml itself, this save put back the worker's older settings, without it.)
    assert!(handle.send(studio_worker::runtime::Command::Pause));
    eventually("paused and saved", SLOW, || home.on_disk().pause.by_user).await;
    assert!(home.on_disk().models.local.contains_key("mine"));

    // A model the worker refuses: the terminal hears why, and nothing changed.
    let refused = tokio::task::block_in_place(|| {
        run(worker(&home.config_path())
            .args(["models", "add", "--id", "other"])
            .arg(home.dir.path()))
    });
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));

    // `register --reset` while it runs: the worker forgets and asks the studio again now.
    let reset = tokio::task::block_in_place(|| {
        run(worker(&home.config_path()).args(["register", "--reset"]))
    });
    assert!(reset.status.success(), "{}", text(&reset.stderr));
    let said = text(&reset.stdout);
    assert!(said.contains("Forgot worker"), "{said}");
    assert!(
        said.contains("asks the studio for approval again now"),
        "{said}"
    );
    eventually("asked again", SLOW, || studio.count(Route::Register) == 2).await;
    let on_disk = home.on_disk();
    assert!(on_disk.models.local.contains_key("mine"), "kept");
    assert!(on_disk.pause.by_user, "kept");
    runtime.shutdown().await;
}

//! `config.toml` on disk: atomic under `kill -9`, owner-only, broken files kept aside.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use studio_worker::config::{self, Config, SharedConfig};
use studio_worker::runtime::WorkerStatus;
use studio_worker::secret::Secret;

use crate::support::WorkerHome;

const SAVE_LOOP_ENV: &str = "STUDIO_WORKER_TEST_SAVE_LOOP";

/// Two configs that differ everywhere and are large enough (~1 MB) that a write takes long
/// enough to be interrupted in the middle.
fn variant(which: char) -> Config {
    Config {
        worker_name: which.to_string().repeat(1 << 20),
        worker_id: Some(format!("w_{which}")),
        auth_token: Some(Secret::new(format!("tok_{which}_0123456789abcdef"))),
        ..Config::default()
    }
}

/// Not a test of its own: the child process of `save_survives_kill_at_any_instant`, which
/// runs this test binary again with only this test selected.
#[test]
#[ignore = "child process of save_survives_kill_at_any_instant"]
fn save_loop_child() {
    let Ok(path) = std::env::var(SAVE_LOOP_ENV) else {
        return;
    };
    let (a, b) = (variant('a'), variant('b'));
    println!("ready");
    loop {
        config::save(Path::new(&path), &a).unwrap();
        config::save(Path::new(&path), &b).unwrap();
    }
}

#[test]
fn save_survives_kill_at_any_instant() {
    let home = WorkerHome::new();
    let path = home.config_path();
    let (a, b) = (variant('a'), variant('b'));
    config::save(&path, &a).unwrap();

    let me = std::env::current_exe().unwrap();
    let mut seen_b = false;
    for round in 0..25 {
        let mut child = Command::new(&me)
            .args([
                "--exact",
                "config_file::save_loop_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SAVE_LOOP_ENV, &path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(40 + fastrand::u64(..60)));
        child.kill().unwrap(); // SIGKILL: no destructors, no flush, mid-write
        child.wait().unwrap();

        let loaded = config::load(&path).unwrap();
        assert!(loaded.recovered_from.is_none(), "round {round}: torn file");
        assert!(
            loaded.config == a || loaded.config == b,
            "round {round}: the file is neither the old nor the new config"
        );
        seen_b |= loaded.config == b;
    }
    assert!(
        seen_b,
        "the child never got a save through; the test proved nothing"
    );
    let leftovers: Vec<_> = std::fs::read_dir(home.dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".tmp-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "load cleans up interrupted saves: {leftovers:?}"
    );
}

#[cfg(unix)]
#[test]
fn the_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let home = WorkerHome::new();
    let path = home.config_path();
    std::fs::write(&path, "worker_name = \"x\"\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

    config::save(&path, &variant('a')).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a token must not be readable by other users");

    let nested = home.dir.path().join("new/folder/config.toml");
    config::save(&nested, &variant('a')).unwrap();
    let folder_mode = std::fs::metadata(nested.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(folder_mode, 0o700);
}

#[test]
fn a_broken_file_is_kept_aside_never_overwritten() {
    let home = WorkerHome::new();
    let path = home.config_path();
    let original =
        "worker_name = \"rig\"\nauth_token = \"tok_VERY_SECRET_VALUE_123\"\nworker_id = [oops\n";
    std::fs::write(&path, original).unwrap();

    let loaded = config::load(&path).unwrap();
    let broken = loaded.recovered_from.expect("reported as broken");
    assert_eq!(loaded.config, Config::default(), "starts from defaults");
    assert!(!path.exists(), "moved, not copied");
    assert_eq!(
        std::fs::read_to_string(&broken.kept_at).unwrap(),
        original,
        "kept byte for byte"
    );
    let kept_name = broken
        .kept_at
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(kept_name.starts_with("config.toml.broken-"), "{kept_name}");
    assert!(broken.reason.contains("line 3"), "{}", broken.reason);
    assert!(
        !broken.reason.contains("SECRET"),
        "the reason never quotes the file: {}",
        broken.reason
    );

    // Saving afterwards writes a new file beside the kept one.
    config::save(&path, &loaded.config).unwrap();
    assert!(path.exists() && broken.kept_at.exists());
}

#[test]
fn settings_this_version_does_not_know_are_shown_and_kept_through_every_save() {
    // A hand-edited file with a misspelt name, and a section a newer version wrote.
    let home = WorkerHome::new();
    let path = home.config_path();
    std::fs::write(
        &path,
        "worker_name = \"rig\"\n\n[policy]\ntemprature_limit_c = 70\n\n\
         [telemetry]\nendpoint = \"https://example.invalid\"\n",
    )
    .unwrap();

    let loaded = config::load(&path).unwrap();
    assert!(
        loaded.recovered_from.is_none(),
        "not broken: the rest is used"
    );
    let status = WorkerStatus::new(&loaded.config);
    assert_eq!(
        status.settings_unknown,
        ["policy.temprature_limit_c", "telemetry.endpoint"]
    );

    // Every change goes through the one writer; what it did not know stays in the file.
    let shared = SharedConfig::new(path.clone(), loaded.config);
    shared.update(|c| c.pause.by_user = true).unwrap();
    shared.update(|c| c.policy.pause_for_games = false).unwrap();
    let written = std::fs::read_to_string(&path).unwrap();
    let raw: toml::Table = toml::from_str(&written).unwrap();
    assert_eq!(raw["policy"]["temprature_limit_c"].as_integer(), Some(70));
    assert_eq!(
        raw["telemetry"]["endpoint"].as_str(),
        Some("https://example.invalid")
    );
    let again = config::load(&path).unwrap().config;
    assert!(again.pause.by_user && !again.policy.pause_for_games);
    assert_eq!(again.worker_name, "rig");
    assert_eq!(again, *shared.snapshot());
}

#[test]
fn wrong_types_and_non_utf8_count_as_broken() {
    for bytes in [
        b"access_revoked = \"maybe\"\n".to_vec(),
        b"[pause]\nby_user = 3\n".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x41],
    ] {
        let home = WorkerHome::new();
        std::fs::write(home.config_path(), &bytes).unwrap();
        let loaded = config::load(&home.config_path()).unwrap();
        assert!(loaded.recovered_from.is_some(), "{bytes:?}");
    }
}

#[test]
fn a_missing_file_gives_defaults_and_creates_nothing() {
    let home = WorkerHome::new();
    let loaded = config::load(&home.config_path()).unwrap();
    assert_eq!(loaded.config, Config::default());
    assert!(loaded.recovered_from.is_none());
    assert!(!home.config_path().exists());
}

#[test]
fn a_failed_save_changes_nothing_in_memory() {
    let home = WorkerHome::new();
    // The config "folder" is a file: every save fails, as on a full or read-only disk.
    let blocker = home.dir.path().join("not-a-folder");
    std::fs::write(&blocker, "").unwrap();
    let shared = SharedConfig::new(blocker.join("config.toml"), Config::default());
    let mut changes = shared.subscribe();
    changes.borrow_and_update();

    let result = shared.update(|c| c.pause.by_user = true);
    assert!(result.is_err());
    assert!(
        !shared.snapshot().pause.by_user,
        "memory never claims what disk does not hold"
    );
    assert!(!changes.has_changed().unwrap(), "nothing was published");
}

#[test]
fn an_update_that_changes_nothing_writes_nothing() {
    let home = WorkerHome::new();
    let shared = SharedConfig::new(home.config_path(), Config::default());
    shared.update(|_| ()).unwrap();
    assert!(!home.config_path().exists());
    shared.update(|c| c.pause.by_user = true).unwrap();
    assert!(home.config_path().exists());
    assert!(
        config::load(&home.config_path())
            .unwrap()
            .config
            .pause
            .by_user
    );
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config {
        cases: 2000,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })]

    /// A settings file with one line's value replaced (or the line dropped): read, or refused
    /// with a reason, never a panic; what is read saves and reads back the same, settings it
    /// does not know included (a dropped `[section]` line moves its settings into the one
    /// before, where they are unknown).
    #[test]
    fn mutated_settings_files_are_read_or_refused(
        line in proptest::prelude::any::<proptest::sample::Index>(),
        value in proptest::option::weighted(0.9, proptest::prop_oneof![
            proptest::strategy::Strategy::prop_map(
                proptest::prelude::any::<i64>(),
                |number| number.to_string()
            ),
            proptest::strategy::Just("-1".to_owned()),
            proptest::strategy::Just("1e400".to_owned()),
            proptest::strategy::Just("nan".to_owned()),
            proptest::strategy::Just("\"\"".to_owned()),
            proptest::strategy::Just("\"x\"".to_owned()),
            proptest::strategy::Just("[]".to_owned()),
            proptest::strategy::Just("[1, 2]".to_owned()),
            proptest::strategy::Just("{}".to_owned()),
            proptest::strategy::Just("true".to_owned()),
            proptest::strategy::Just("\"1979-05-27T07:32:00Z\"".to_owned()),
            "[ -~]{0,20}",
        ]),
    ) {
        let mut full = Config {
            worker_id: Some("w_1".to_owned()),
            auth_token: Some(Secret::new("tok_0123456789abcdef")),
            ..Config::default()
        };
        full.policy.always_pause_for = vec!["game.exe".to_owned()];
        let text = toml::to_string(&full).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let index = line.index(lines.len());
        let mutated: Vec<String> = lines
            .iter()
            .enumerate()
            .filter_map(|(at, original)| match (&value, at == index) {
                (_, false) => Some((*original).to_owned()),
                (None, true) => None,
                (Some(value), true) => Some(match original.split_once(" = ") {
                    Some((key, _)) => format!("{key} = {value}"),
                    None => (*original).to_owned(),
                }),
            })
            .collect();
        match config::parse(mutated.join("\n").as_bytes()) {
            Ok(read) => {
                let saved = config::to_text(&read).unwrap();
                proptest::prop_assert_eq!(config::parse(saved.as_bytes()).unwrap(), read);
            }
            Err(reason) => proptest::prop_assert!(!reason.to_string().is_empty()),
        }
    }
}

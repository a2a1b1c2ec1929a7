//! The model manager against the in-process hub: fresh, resumed, corrupt, short of disk,
//! gated, offline, verified and removed downloads of a real (tiny) diffusers pipeline.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use studio_worker::engine::sd::StableDiffusion;
use studio_worker::models::catalog::{CatalogEntry, JobDefaults};
use studio_worker::models::hub::{HubClient, HubError};
use studio_worker::models::hub_cache::HubCache;
use studio_worker::models::store::{DownloadProgress, ModelState, ModelStore, PullError};
use studio_worker::secret::Secret;
use studio_worker::vocab::job::Scheduler;
use tokio_util::sync::CancellationToken;

use std::collections::BTreeMap;

use studio_worker::config::{self, Config};
use studio_worker::engine::Engine;
use studio_worker::engine::candle_engine::CandleEngine;
use studio_worker::engine::device;
use studio_worker::runtime::{Command, ModelSupply, Runtime, RuntimeOptions};
use studio_worker::vocab::device::DevicePreference;

use crate::support::hub::TestHub;
use crate::support::studio::{Decision, Route, TestStudio};
use crate::support::{PATIENCE, WorkerHome, eventually, fast_timing};

const REPO: &str = "test-org/tiny-sd1";
const UNET: &str = "unet/diffusion_pytorch_model.safetensors";

const ENTRY: CatalogEntry = CatalogEntry {
    id: "tiny",
    display_name: "Tiny SD",
    repo: REPO,
    revision: "main",
    prefer_fp16: true,
    download_bytes: 2_300_000,
    min_gpu_mb: 1,
    defaults: JobDefaults {
        size: 64,
        steps: 2,
        guidance_scale: 0.0,
        scheduler: Scheduler::Euler,
    },
};

struct Setup {
    hub: TestHub,
    client: HubClient,
    store: ModelStore,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd1")
}

async fn setup() -> Setup {
    let hub = TestHub::start().await;
    hub.publish_folder(REPO, &fixture());
    let cache_dir = tempfile::tempdir().unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let store = ModelStore::new(HubCache::new(cache_dir.path().to_owned()), data_dir.path());
    Setup {
        client: HubClient::new(&hub.endpoint(), None).unwrap(),
        hub,
        store,
        _dirs: (cache_dir, data_dir),
    }
}

/// A worker over `home` with a CPU engine serving nothing yet, fetching `ENTRY` from the
/// setup's hub when the settings enable it.
fn start_with_downloads(
    home: &crate::support::WorkerHome,
    setup: &Setup,
) -> studio_worker::runtime::Runtime {
    start_with_downloads_within(home, setup, 0)
}

/// The same, the engine's memory budget `budget_mb` (0: its default).
fn start_with_downloads_within(
    home: &crate::support::WorkerHome,
    setup: &Setup,
    budget_mb: u64,
) -> studio_worker::runtime::Runtime {
    let cpu = device::select(DevicePreference::Cpu).unwrap();
    let (engine, _) = CandleEngine::new(cpu, &BTreeMap::new(), budget_mb);
    Runtime::start(
        home.shared(),
        RuntimeOptions {
            timing: fast_timing(),
            data_dir: home.dir.path().to_path_buf(),
            api_base_override: None,
            engine: Some(Arc::new(engine)),
            recovered_config: None,
            model_supply: Some(ModelSupply {
                store: setup.store.clone(),
                hub: setup.client.clone(),
                catalog: vec![ENTRY],
            }),
            probes: None,
            tolerate_invalid_studio_url: false,
            gpu_recovery: Default::default(),
        },
    )
    .unwrap()
}

/// A studio that approves at the first poll after the registration, and a worker home whose
/// settings point at it and enable `enabled` catalog models.
async fn studio_and_home_enabling(enabled: &[&str]) -> (TestStudio, WorkerHome) {
    let studio = TestStudio::start().await;
    studio.set_decision(Decision::ApproveAfterPolls(1));
    let home = WorkerHome::new();
    let mut settings: Config = home.write_config(&studio.url());
    settings.models.enabled = enabled.iter().map(|id| (*id).to_owned()).collect();
    config::save(&home.config_path(), &settings).unwrap();
    (studio, home)
}

async fn pull(setup: &Setup) -> (Result<PathBuf, PullError>, Vec<DownloadProgress>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let result = setup
        .store
        .pull(
            &setup.client,
            &ENTRY,
            &mut move |progress| sink.lock().unwrap().push(progress.clone()),
            &CancellationToken::new(),
        )
        .await;
    let seen = seen.lock().unwrap().clone();
    (result, seen)
}

#[tokio::test]
async fn a_fresh_download_lands_in_the_hub_cache_and_loads() {
    let setup = setup().await;
    assert_eq!(setup.store.state(&ENTRY), ModelState::Absent);
    let (result, progress) = pull(&setup).await;
    let folder = result.expect("pulls");

    // The huggingface_hub layout: snapshots/<commit>/… linking to blobs, and refs/main.
    assert!(folder.starts_with(setup.store.cache().repo_dir(REPO).join("snapshots")));
    assert_eq!(
        setup.store.cache().read_ref(REPO, "main").as_deref(),
        Some("0123456789abcdef0123456789abcdef01234567")
    );
    // A symlink where the system makes them (Windows without developer mode does not: a
    // hard link there), reading as the blob.
    let snapshot_file = folder.join(UNET);
    if cfg!(unix) {
        assert!(
            snapshot_file
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
    let blobs = setup.store.cache().repo_dir(REPO).join("blobs");
    let blob = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|item| item.unwrap().path())
        .find(|blob| std::fs::read(blob).unwrap() == std::fs::read(&snapshot_file).unwrap());
    assert!(
        blob.is_some(),
        "the snapshot's UNet reads as one of the blobs"
    );
    // Only what the pipeline needs: no README, no .bin duplicate.
    let fetched: Vec<String> = setup.hub.downloads().into_iter().map(|d| d.path).collect();
    assert!(
        !fetched
            .iter()
            .any(|path| path.ends_with(".bin") || path == "README.md")
    );
    assert!(fetched.contains(&UNET.to_owned()));

    // Progress climbs to the total.
    let last = progress.last().expect("progress was reported");
    assert_eq!(last.done_bytes, last.total_bytes);
    assert!(
        progress
            .windows(2)
            .all(|pair| pair[0].done_bytes <= pair[1].done_bytes)
    );
    assert!(matches!(
        setup.store.state(&ENTRY),
        ModelState::Ready { .. }
    ));

    // It is a model the engine runs.
    let device = candle_core::Device::Cpu;
    StableDiffusion::load(&folder, &device, candle_core::DType::F32).expect("loads");

    // A second pull fetches nothing.
    let before = setup.hub.downloads().len();
    pull(&setup).await.0.expect("pulls again");
    assert_eq!(setup.hub.downloads().len(), before, "nothing fetched twice");
}

#[tokio::test]
async fn an_interrupted_transfer_resumes_where_it_stopped() {
    let setup = setup().await;
    let size = setup.hub.file_size(REPO, UNET);
    setup.hub.cut_next_transfer(UNET, 300_000);
    let (result, _) = pull(&setup).await;
    let error = result.expect_err("the cut transfer fails the pull");
    assert!(
        matches!(&error, PullError::Hub(hub) if hub.is_transient()),
        "{error}"
    );
    assert!(matches!(
        setup.store.state(&ENTRY),
        ModelState::Partial { .. }
    ));
    assert!(
        setup.store.ready_path(&ENTRY).is_none(),
        "a half model is never ready"
    );

    pull(&setup).await.0.expect("the second pull completes");
    let unet: Vec<_> = setup
        .hub
        .downloads()
        .into_iter()
        .filter(|download| download.path == UNET)
        .collect();
    assert_eq!(unet.len(), 2);
    assert_eq!(unet[0].range_start, None);
    assert_eq!(
        unet[1].range_start,
        Some(300_000),
        "resumed with a Range request"
    );
    assert_eq!(
        unet[0].bytes_sent + unet[1].bytes_sent,
        size,
        "no byte fetched twice"
    );
    assert!(setup.store.ready_path(&ENTRY).is_some());
}

#[tokio::test]
async fn a_corrupt_file_is_fetched_again_and_never_used() {
    let setup = setup().await;
    setup.hub.corrupt_next_transfers(UNET, 1);
    pull(&setup).await.0.expect("the second transfer is good");
    let unet_transfers = setup
        .hub
        .downloads()
        .iter()
        .filter(|d| d.path == UNET)
        .count();
    assert_eq!(unet_transfers, 2);
    assert!(setup.store.verify(&ENTRY).unwrap().is_empty());

    // Corrupt every time: the pull fails and nothing is marked ready.
    let setup = self::setup().await;
    setup.hub.corrupt_next_transfers(UNET, 10);
    let error = pull(&setup).await.0.expect_err("corrupt twice");
    assert!(
        matches!(error, PullError::Corrupt { ref path } if path == UNET),
        "{error}"
    );
    assert!(setup.store.ready_path(&ENTRY).is_none());
}

#[tokio::test]
async fn too_little_disk_space_is_refused_before_downloading() {
    let mut setup = setup().await;
    setup.store = setup.store.clone().with_free_space(50_000_000);
    let error = pull(&setup).await.0.expect_err("short of disk");
    let message = error.to_string();
    assert!(
        matches!(
            error,
            PullError::DiskShort {
                available: 50_000_000,
                ..
            }
        ),
        "{message}"
    );
    assert!(message.contains("50.0 MB is free"), "{message}");
    assert!(setup.hub.downloads().is_empty(), "nothing fetched");
    assert_eq!(setup.store.state(&ENTRY), ModelState::Absent);
}

#[tokio::test]
async fn a_gated_repository_says_a_token_is_needed_and_works_with_one() {
    let setup = setup().await;
    setup.hub.gate(REPO, Some("hf_secret_token_123"));
    let error = pull(&setup).await.0.expect_err("gated");
    let message = error.to_string();
    assert!(
        matches!(error, PullError::Hub(HubError::Unauthorized { .. })),
        "{message}"
    );
    assert!(message.contains("HF_TOKEN"), "{message}");

    let with_token = Setup {
        client: HubClient::new(
            &setup.hub.endpoint(),
            Some(Secret::new("hf_secret_token_123".to_owned())),
        )
        .unwrap(),
        ..setup
    };
    pull(&with_token).await.0.expect("the token opens it");
}

#[tokio::test]
async fn hostile_hub_answers_never_become_paths_and_never_fill_the_disk() {
    let setup = setup().await;
    let listing = |commit: &str, path: &str| {
        serde_json::json!({
            "id": REPO, "sha": commit,
            "siblings": [{ "rfilename": path, "size": 10, "blobId": "a".repeat(40) }]
        })
    };
    let refused = |error: PullError, what: &str| {
        let message = error.to_string();
        assert!(
            matches!(error, PullError::Hub(HubError::Garbled { .. })),
            "{message}"
        );
        assert!(message.contains(what), "{message}");
    };

    setup
        .hub
        .override_listing(Some(listing("../../../../tmp/evil", "model_index.json")));
    refused(pull(&setup).await.0.unwrap_err(), "not a git hash");
    setup.hub.override_listing(Some(listing(
        "0123456789abcdef0123456789abcdef01234567",
        "../../../escape.json",
    )));
    refused(pull(&setup).await.0.unwrap_err(), "leaves its folder");
    setup.hub.override_listing(Some(listing(
        "0123456789abcdef0123456789abcdef01234567",
        "unet\\..\\..\\escape.json",
    )));
    refused(pull(&setup).await.0.unwrap_err(), "paths cannot hold");
    // Asked for a pinned commit, it answers for another.
    let pinned = CatalogEntry {
        revision: "1111111111111111111111111111111111111111",
        ..ENTRY
    };
    let error = setup
        .store
        .pull(
            &setup.client,
            &pinned,
            &mut |_| {},
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    refused(error, "instead of 1111111111111111111111111111111111111111");
    // Two megabytes of listing: refused before it is parsed.
    let mut huge = listing(
        "0123456789abcdef0123456789abcdef01234567",
        "model_index.json",
    );
    huge["padding"] = serde_json::json!("x".repeat(2 << 20));
    setup.hub.override_listing(Some(huge));
    refused(pull(&setup).await.0.unwrap_err(), "larger than");
    assert!(setup.hub.downloads().is_empty(), "nothing was fetched");
    assert!(
        !setup
            .store
            .cache()
            .repo_dir(REPO)
            .join("snapshots")
            .exists(),
        "no folder was made from any of these answers"
    );

    // A hub that sends more than it declared: the file stops at its declared size.
    setup.hub.override_listing(None);
    setup.hub.oversend(UNET, 8 << 20);
    let error = pull(&setup).await.0.unwrap_err();
    assert!(error.to_string().contains("more of"), "{error}");
    let declared = setup.hub.file_size(REPO, UNET);
    let partial = setup
        .store
        .cache()
        .incomplete_path(REPO, &setup.hub.file_sha256(REPO, UNET));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), declared);
    // What arrived up to the declared size is the file: the next pull verifies and keeps it.
    pull(&setup)
        .await
        .0
        .expect("the declared bytes are the file");
}

#[tokio::test]
async fn a_complete_cache_is_ready_offline_and_verify_and_remove_work_on_it() {
    let setup = setup().await;
    pull(&setup).await.0.expect("pulls");
    let listings = setup.hub.listings();

    // A new store over the same folders, with no hub at all.
    let ready = setup.store.ready_path(&ENTRY).expect("ready offline");
    assert!(ready.join("model_index.json").exists());
    assert_eq!(setup.hub.listings(), listings, "readiness needs no network");

    // Tampering is found by verify, and the model stops being ready.
    let blob = std::fs::canonicalize(ready.join(UNET)).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let bad = setup.store.verify(&ENTRY).unwrap();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].path, UNET);
    assert!(setup.store.ready_path(&ENTRY).is_none());

    // The next pull fetches only the bad file.
    let before = setup.hub.downloads().len();
    pull(&setup).await.0.expect("repairs");
    let fetched: Vec<_> = setup.hub.downloads()[before..]
        .iter()
        .map(|d| d.path.clone())
        .collect();
    assert_eq!(fetched, vec![UNET.to_owned()]);

    let freed = setup.store.remove(&ENTRY).unwrap();
    assert!(freed > 1_000_000, "freed {freed}");
    assert_eq!(setup.store.state(&ENTRY), ModelState::Absent);
}

#[tokio::test]
async fn a_snapshot_of_copies_is_verified_as_the_pipeline_reads_it() {
    // Where the drive takes no links (FAT), the snapshot holds copies of the blobs: a damaged
    // copy is what the pipeline would load, though its blob is whole.
    let setup = setup().await;
    pull(&setup).await.0.expect("pulls");
    let ready = setup.store.ready_path(&ENTRY).expect("ready");
    let unet = ready.join(UNET);
    let mut bytes = std::fs::read(&unet).unwrap();
    std::fs::remove_file(&unet).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&unet, bytes).unwrap();

    let bad = setup.store.verify(&ENTRY).unwrap();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].path, UNET);
    assert!(setup.store.ready_path(&ENTRY).is_none());
    pull(&setup).await.0.expect("repairs");
    assert!(setup.store.verify(&ENTRY).unwrap().is_empty());
}

#[tokio::test]
async fn a_damaged_file_that_cannot_be_deleted_leaves_the_model_as_it_was() {
    // As on Windows, where the running worker has the weights mapped. Here the blob's place
    // is taken by a folder, which reads as damaged and which remove_file refuses (root,
    // which runs CI, ignores permissions).
    let setup = setup().await;
    pull(&setup).await.0.expect("pulls");
    let ready = setup.store.ready_path(&ENTRY).expect("ready");
    let blob = std::fs::canonicalize(ready.join(UNET)).unwrap();
    let mut damaged = std::fs::read(&blob).unwrap();
    damaged[1000] ^= 1;
    std::fs::remove_file(&blob).unwrap();
    std::fs::create_dir(&blob).unwrap();
    std::fs::write(blob.join("held"), b"x").unwrap();

    let error = setup
        .store
        .verify(&ENTRY)
        .expect_err("cannot delete the damaged blob");
    let said = error.to_string();
    assert!(
        said.starts_with(&format!("{UNET} is damaged and could not be deleted"))
            && said.contains("another program has it open"),
        "{said}"
    );
    // Nothing changed: with the (damaged) blob back in its place the model reads as ready,
    // its manifest kept. Had it gone, the next pull would link the blob left behind again.
    std::fs::remove_dir_all(&blob).unwrap();
    std::fs::write(&blob, damaged).unwrap();
    assert_eq!(setup.store.ready_path(&ENTRY), Some(ready));

    // Once it can be deleted, verify takes it out and the next pull fetches it again.
    let bad = setup.store.verify(&ENTRY).unwrap();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(setup.store.ready_path(&ENTRY).is_none());
    pull(&setup).await.0.expect("repairs");
    assert!(setup.store.verify(&ENTRY).unwrap().is_empty());
}

#[tokio::test]
async fn removing_a_model_that_is_not_complete_deletes_every_file_it_fetched() {
    // A download cut part way: the files before the cut are whole blobs, linked into the
    // snapshot only once every file is here.
    let setup = setup().await;
    setup.hub.cut_next_transfer(UNET, 100_000);
    pull(&setup).await.0.expect_err("cut");
    assert!(matches!(
        setup.store.state(&ENTRY),
        ModelState::Partial { .. }
    ));
    let blobs = setup.store.cache().repo_dir(REPO).join("blobs");
    let fetched: u64 = blob_sizes(&blobs).values().sum();
    assert!(fetched > 100_000, "{fetched}");
    assert_eq!(setup.store.remove(&ENTRY).unwrap(), fetched);
    assert_eq!(setup.store.state(&ENTRY), ModelState::Absent);
    assert!(blob_sizes(&blobs).is_empty());

    // A complete model whose verify took a damaged file out: the rest still goes with it.
    pull(&setup).await.0.expect("pulls");
    let ready = setup.store.ready_path(&ENTRY).expect("ready");
    let unet_blob = std::fs::canonicalize(ready.join(UNET)).unwrap();
    let mut bytes = std::fs::read(&unet_blob).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&unet_blob, bytes).unwrap();
    assert_eq!(setup.store.verify(&ENTRY).unwrap().len(), 1);
    let left: u64 = blob_sizes(&blobs).values().sum();
    assert_eq!(setup.store.remove(&ENTRY).unwrap(), left);
    assert_eq!(setup.store.state(&ENTRY), ModelState::Absent);
    assert!(blob_sizes(&blobs).is_empty());
    assert!(
        files_under(&setup.store.cache().repo_dir(REPO).join("snapshots")).is_empty(),
        "no link left behind"
    );
}

/// The files under `folder`, every level down.
fn files_under(folder: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for item in std::fs::read_dir(folder).unwrap() {
        let path = item.unwrap().path();
        if path.symlink_metadata().unwrap().is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The blobs' sizes by name.
fn blob_sizes(blobs: &std::path::Path) -> BTreeMap<String, u64> {
    files_under(blobs)
        .iter()
        .map(|blob| {
            let name = blob.file_name().unwrap().to_string_lossy().into_owned();
            (name, blob.metadata().unwrap().len())
        })
        .collect()
}

#[tokio::test]
async fn removing_keeps_what_other_snapshots_hold_and_counts_only_what_it_frees() {
    // Windows without developer mode: the snapshot holds hard links. Another snapshot of the
    // repo (another revision, or another tool's download) holds the UNet's blob the same way,
    // and another tool keeps a file of its own in this model's snapshot.
    let setup = setup().await;
    let ready = pull(&setup).await.0.expect("pulls");
    for file in files_under(&ready) {
        if let Ok(target) = std::fs::read_link(&file) {
            let blob = file.parent().unwrap().join(target);
            std::fs::remove_file(&file).unwrap();
            std::fs::hard_link(&blob, &file).unwrap();
        }
    }
    assert_eq!(setup.store.ready_path(&ENTRY), Some(ready.clone()));
    let repo_dir = setup.store.cache().repo_dir(REPO);
    let blobs = repo_dir.join("blobs");
    let unet_blob = blobs.join(
        blob_sizes(&blobs)
            .into_iter()
            .find(|(name, _)| {
                std::fs::read(blobs.join(name)).unwrap() == std::fs::read(ready.join(UNET)).unwrap()
            })
            .unwrap()
            .0,
    );
    let other = repo_dir.join("snapshots").join("another-commit").join(UNET);
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    std::fs::hard_link(&unet_blob, &other).unwrap();
    let theirs = ready.join("notes.txt");
    std::fs::write(&theirs, b"another tool's").unwrap();
    let sizes = blob_sizes(&blobs);
    let unet_size = std::fs::metadata(&unet_blob).unwrap().len();

    let freed = setup.store.remove(&ENTRY).expect("removes");

    assert_eq!(freed, sizes.values().sum::<u64>() - unet_size);
    assert_eq!(
        blob_sizes(&blobs).into_keys().collect::<Vec<_>>(),
        vec![
            unet_blob
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        ],
        "only the blob another snapshot reads stays"
    );
    assert_eq!(std::fs::metadata(&other).unwrap().len(), unet_size);
    assert_eq!(
        files_under(&ready),
        vec![theirs],
        "another tool's file stays"
    );
    assert!(setup.store.ready_path(&ENTRY).is_none());
}

#[tokio::test]
async fn a_file_that_cannot_be_deleted_stops_the_removal_and_removing_again_finishes_it() {
    // As on Windows, where a file another program has open cannot be deleted. Here a file's
    // place is taken by a folder, which remove_file refuses (root, which runs CI, ignores
    // permissions).
    let setup = setup().await;
    let ready = pull(&setup).await.0.expect("pulls");
    let blobs = setup.store.cache().repo_dir(REPO).join("blobs");
    let total: u64 = blob_sizes(&blobs).values().sum();
    let unet = ready.join(UNET);
    std::fs::remove_file(&unet).unwrap();
    std::fs::create_dir(&unet).unwrap();
    std::fs::write(unet.join("held"), b"x").unwrap();

    let said = setup
        .store
        .remove(&ENTRY)
        .expect_err("cannot delete the held file")
        .to_string();
    assert!(
        said.contains(UNET.rsplit('/').next().unwrap())
            && said.contains("another program has it open")
            && said.ends_with("remove the model again"),
        "{said}"
    );
    // Not ready, and not forgotten either: the manifest is still there for the next removal.
    assert!(setup.store.ready_path(&ENTRY).is_none());
    assert_ne!(setup.store.state(&ENTRY), ModelState::Absent);

    // Once the other program has let go, removing again deletes the rest, the held file's
    // blob too.
    std::fs::remove_dir_all(&unet).unwrap();
    let freed = setup.store.remove(&ENTRY).expect("removes the rest");
    assert_eq!(freed, total);
    assert_eq!(setup.store.state(&ENTRY), ModelState::Absent);
    assert!(blob_sizes(&blobs).is_empty());
}

/// A worker enabling "tiny", whose repository is gated: once its download shows why it
/// cannot go on.
async fn a_worker_whose_download_is_gated() -> (Setup, TestStudio, WorkerHome, Runtime) {
    let hub_setup = setup().await;
    hub_setup.hub.gate(REPO, Some("hf_needed"));
    let (studio, home) = studio_and_home_enabling(&["tiny"]).await;
    let runtime = start_with_downloads(&home, &hub_setup);
    let handle = runtime.handle();
    eventually("the download problem is shown", PATIENCE, || {
        handle.status().downloads.iter().any(|download| {
            download
                .problem
                .as_deref()
                .is_some_and(|p| p.contains("HF_TOKEN"))
        })
    })
    .await;
    (hub_setup, studio, home, runtime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_downloads_enabled_models_in_the_background_and_then_serves_them() {
    // Gated: the status says why, and the worker heartbeats as `loading`, claiming nothing.
    let (hub_setup, studio, home, runtime) = a_worker_whose_download_is_gated().await;
    eventually("a loading heartbeat", PATIENCE, || {
        studio.workers().iter().any(|worker| {
            worker.heartbeats.iter().any(|beat| {
                // Announced as coming, not ready, and not claimed.
                beat["state"] == "loading"
                    && beat["capabilities"]["models"]
                        == serde_json::json!([{ "id": "tiny", "ready": false }])
            })
        })
    })
    .await;
    runtime.shutdown().await;

    // Open again: the next start downloads it and serves it without a restart in between.
    hub_setup.hub.gate(REPO, None);
    let runtime = start_with_downloads(&home, &hub_setup);
    let handle = runtime.handle();
    eventually("served after the download", PATIENCE, || {
        studio.workers().iter().any(|worker| {
            worker.heartbeats.last().is_some_and(|beat| {
                beat["capabilities"]["models"]
                    == serde_json::json!([{ "id": "tiny", "ready": true }])
            })
        })
    })
    .await;
    assert!(handle.status().downloads.is_empty());
    assert_eq!(
        handle.status().models_summary().as_deref(),
        Some("models ready: tiny")
    );
    let job = serde_json::json!({
        "jobId": "after-download", "kind": "txt2img", "model": "tiny",
        "prompt": "a lighthouse", "negativePrompt": "", "width": 64, "height": 64,
        "steps": 2, "guidanceScale": 0.0, "seed": 1, "numImages": 1, "scheduler": null,
        "leaseS": 120
    });
    studio.enqueue(job);
    eventually("delivered", PATIENCE, || {
        studio
            .job("after-download")
            .is_some_and(|job| !job.results.is_empty())
    })
    .await;
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabling_a_model_while_running_downloads_and_serves_it_at_once() {
    let hub_setup = setup().await;
    let (studio, home) = studio_and_home_enabling(&[]).await;
    let runtime = start_with_downloads(&home, &hub_setup);
    let handle = runtime.handle();
    eventually("a heartbeat", PATIENCE, || {
        studio
            .workers()
            .iter()
            .any(|worker| !worker.heartbeats.is_empty())
    })
    .await;
    assert!(
        hub_setup.hub.downloads().is_empty(),
        "nothing enabled, nothing fetched"
    );

    handle
        .config()
        .update(|config| config.models.enabled = vec!["tiny".to_owned()])
        .unwrap();
    eventually("served without a restart", PATIENCE, || {
        studio.workers().iter().any(|worker| {
            worker.heartbeats.last().is_some_and(|beat| {
                beat["capabilities"]["models"]
                    == serde_json::json!([{ "id": "tiny", "ready": true }])
            })
        })
    })
    .await;
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downloaded_model_the_memory_budget_cannot_hold_is_shown_as_not_served() {
    let hub_setup = setup().await;
    let (studio, home) = studio_and_home_enabling(&["tiny"]).await;
    // 1 MB: the tiny model's f32 weights are 2.25 MB.
    let runtime = start_with_downloads_within(&home, &hub_setup, 1);
    let handle = runtime.handle();
    eventually("refused once downloaded", PATIENCE, || {
        handle
            .status()
            .models_refused
            .iter()
            .any(|refused| refused.model_id == "tiny")
    })
    .await;
    let status = handle.status();
    assert!(status.downloads.is_empty(), "no longer coming");
    assert_eq!(
        status.models_summary().as_deref(),
        Some("no model ready yet")
    );
    let reason = &status.models_refused[0].reason;
    assert!(
        reason.starts_with("its weights need about 2.25 MB of the machine's memory")
            && reason.ends_with("may use 1.05 MB of it"),
        "{reason}"
    );
    // Neither ready nor coming: the studio is not told of it.
    eventually("a heartbeat without it", PATIENCE, || {
        studio.workers().iter().any(|worker| {
            worker
                .heartbeats
                .last()
                .is_some_and(|beat| beat["capabilities"]["models"] == serde_json::json!([]))
        })
    })
    .await;
    runtime.shutdown().await;
}

#[test]
fn the_engine_leaves_out_a_local_folder_whose_weights_do_not_fit_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let spoiled = dir.path().join("spoiled");
    crate::support::files::copy_folder(&fixture(), &spoiled);
    let config_path = spoiled.join("text_encoder/config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace("\"intermediate_size\": 37", "\"intermediate_size\": 64"),
    )
    .unwrap();
    let models = BTreeMap::from([
        ("good".to_owned(), fixture()),
        ("spoiled".to_owned(), spoiled),
    ]);
    let cpu = device::select(DevicePreference::Cpu).unwrap();
    let (engine, refused) = CandleEngine::new(cpu, &models, 0);
    assert_eq!(engine.ready_models(), vec!["good"]);
    assert_eq!(refused.len(), 1);
    // What the runtime shows the person at start.
    assert_eq!(engine.refused_models(), refused);
    assert!(
        refused[0].reason.contains("mlp.fc1.weight") && refused[0].reason.contains("shape"),
        "{}",
        refused[0].reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_folder_added_from_the_window_is_checked_then_served_at_once() {
    let studio = TestStudio::start().await;
    let home = WorkerHome::new();
    home.write_config(&studio.url());
    // "mine" was a folder that is not a model when the worker started: refused then, and
    // the Status tab says so.
    let empty = tempfile::tempdir().unwrap();
    let cpu = device::select(DevicePreference::Cpu).unwrap();
    let at_start = BTreeMap::from([("mine".to_owned(), empty.path().to_owned())]);
    let (engine, _) = CandleEngine::new(cpu, &at_start, 0);
    let engine = Arc::new(engine);
    let runtime = home.start_runtime_with(fast_timing(), Some(engine.clone()));
    let handle = runtime.handle();
    let refused_at_start = |handle: &studio_worker::runtime::RuntimeHandle| {
        handle.status().models_refused.iter().any(|refused| {
            refused.model_id == "mine" && refused.reason.contains("model_index.json")
        })
    };
    assert!(refused_at_start(&handle));

    // A folder that is not a model: refused, with the reason where the window shows it.
    handle.send(Command::AddLocalModel {
        model_id: "nothing".into(),
        folder: empty.path().to_owned(),
    });
    eventually("the refusal is shown", PATIENCE, || {
        handle
            .status()
            .settings_problem
            .is_some_and(|problem| problem.contains("model_index.json"))
    })
    .await;
    assert!(home.on_disk().models.local.is_empty());

    handle.send(Command::AddLocalModel {
        model_id: "mine".into(),
        folder: fixture(),
    });
    // Saved, and the earlier refusal cleared (the status follows the save).
    eventually("saved", PATIENCE, || {
        home.on_disk().models.local.contains_key("mine")
            && handle.status().settings_problem.is_none()
    })
    .await;
    assert_eq!(engine.ready_models(), vec!["mine"]);
    // Served now: no longer shown as refused.
    eventually("the start's refusal cleared", PATIENCE, || {
        !refused_at_start(&handle)
    })
    .await;
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_folder_left_out_is_no_longer_served_and_its_files_stay() {
    let studio = TestStudio::start().await;
    studio.set_decision(Decision::ApproveAfterPolls(1));
    let home = WorkerHome::new();
    let mut settings: Config = home.write_config(&studio.url());
    // "mine" serves; "gone" is a folder that is not a model (refused at start).
    let empty = tempfile::tempdir().unwrap();
    let local = BTreeMap::from([
        ("mine".to_owned(), fixture()),
        ("gone".to_owned(), empty.path().to_owned()),
    ]);
    settings.models.local = local.clone();
    config::save(&home.config_path(), &settings).unwrap();
    let cpu = device::select(DevicePreference::Cpu).unwrap();
    let (engine, _) = CandleEngine::new(cpu, &local, 0);
    let engine = Arc::new(engine);
    let runtime = home.start_runtime_with(fast_timing(), Some(engine.clone()));
    let handle = runtime.handle();
    eventually("mine advertised", PATIENCE, || {
        advertised(&studio) == Some(serde_json::json!([{ "id": "mine", "ready": true }]))
    })
    .await;
    assert!(
        handle
            .status()
            .models_refused
            .iter()
            .any(|refused| refused.model_id == "gone")
    );

    let said = remove(&handle, "mine")
        .await
        .expect("left out")
        .expect("a note");
    assert!(
        said.starts_with("Stopped serving mine; its folder "),
        "{said}"
    );
    assert!(engine.ready_models().is_empty(), "no longer served");
    eventually("no longer advertised", PATIENCE, || {
        advertised(&studio) == Some(serde_json::json!([]))
    })
    .await;
    assert!(
        fixture().join("model_index.json").exists(),
        "its files stay"
    );

    // A refused folder left out is no longer shown as refused.
    remove(&handle, "gone").await.expect("left out");
    assert!(handle.status().models_refused.is_empty());
    assert!(home.on_disk().models.local.is_empty());

    let unknown = remove(&handle, "mine")
        .await
        .expect_err("nothing called mine any more");
    assert!(
        unknown.contains(
            "no catalog model this worker downloads, and no model folder, is called mine"
        ),
        "{unknown}"
    );
    runtime.shutdown().await;
}

/// A pull of `ENTRY` started in the background whose UNet transfer stalls: it holds the
/// model (as another process's `models pull` would) until `cancel` stops it.
async fn a_stalled_pull(
    setup: &Setup,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<Result<PathBuf, PullError>> {
    setup.hub.stall_next_transfer(UNET, 100_000);
    let first = tokio::spawn({
        let (store, client, cancel) = (setup.store.clone(), setup.client.clone(), cancel.clone());
        async move { store.pull(&client, &ENTRY, &mut |_| {}, &cancel).await }
    });
    until_the_unet_is_fetched(setup).await;
    first
}

/// Returns once the hub was asked for the UNet (which a test may have it stall).
async fn until_the_unet_is_fetched(setup: &Setup) {
    eventually("the UNet is being fetched", PATIENCE, || {
        setup
            .hub
            .downloads()
            .iter()
            .any(|download| download.path == UNET)
    })
    .await;
}

/// `RemoveModel` through the window's door, and what came of it.
async fn remove(
    handle: &studio_worker::runtime::RuntimeHandle,
    model_id: &str,
) -> studio_worker::runtime::CommandOutcome {
    let (outcome, answer) = tokio::sync::oneshot::channel();
    handle.ask(
        Command::RemoveModel {
            model_id: model_id.into(),
        },
        outcome,
    );
    tokio::time::timeout(PATIENCE, answer)
        .await
        .expect("answered in time")
        .expect("answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_download_of_a_model_at_a_time_across_processes() {
    let setup = setup().await;
    let cancel = CancellationToken::new();
    let first = a_stalled_pull(&setup, &cancel).await;

    // Another download of it (the lock is per open file, so this process stands in for
    // another) is refused at once, before it touches a file; so are a removal and a verify.
    let transfers = setup.hub.downloads().len();
    let second = pull(&setup).await.0;
    assert!(
        matches!(&second, Err(PullError::Busy(model_id)) if model_id == "tiny"),
        "{second:?}"
    );
    assert_eq!(setup.hub.downloads().len(), transfers, "nothing fetched");
    assert!(matches!(
        setup.store.remove(&ENTRY),
        Err(PullError::Busy(_))
    ));
    assert!(matches!(
        setup.store.verify(&ENTRY),
        Err(PullError::Busy(_))
    ));

    // Once the first has stopped, the next one carries on from what it fetched.
    cancel.cancel();
    first.await.unwrap().expect_err("stopped");
    pull(&setup).await.0.expect("pulls");
    assert!(setup.store.ready_path(&ENTRY).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_waits_for_another_download_of_its_model_then_serves_it() {
    let hub_setup = setup().await;
    let cancel = CancellationToken::new();
    let outside = a_stalled_pull(&hub_setup, &cancel).await;
    let (studio, home) = studio_and_home_enabling(&["tiny"]).await;
    let runtime = start_with_downloads(&home, &hub_setup);
    let handle = runtime.handle();
    eventually("the wait is shown", PATIENCE, || {
        handle.status().downloads.iter().any(|download| {
            download.problem.as_deref().is_some_and(|problem| {
                problem.contains("process (`models pull`) is downloading it")
            })
        })
    })
    .await;

    // `models pull` stopped (Ctrl-C): the worker takes over, and serves the model.
    cancel.cancel();
    outside.await.unwrap().expect_err("stopped");
    eventually("served", PATIENCE, || {
        advertised(&studio) == Some(serde_json::json!([{ "id": "tiny", "ready": true }]))
    })
    .await;
    assert!(handle.status().downloads.is_empty());
    runtime.shutdown().await;
}

/// The models the worker's last heartbeat advertised.
fn advertised(studio: &TestStudio) -> Option<serde_json::Value> {
    studio.workers().iter().find_map(|worker| {
        worker
            .heartbeats
            .last()
            .map(|beat| beat["capabilities"]["models"].clone())
    })
}

/// The Settings tab's save, with `enabled` ticked and the rest as the settings hold it.
fn ticking(handle: &studio_worker::runtime::RuntimeHandle, enabled: &[&str]) -> Command {
    let settings = handle.config().snapshot();
    Command::SaveSettings(studio_worker::runtime::SettingsChange {
        api_base_url: settings.api_base_url.clone(),
        worker_name: settings.worker_name.clone(),
        unload_when_paused: settings.engine.unload_when_paused,
        device: settings.engine.device,
        enabled_models: enabled.iter().map(|id| (*id).to_owned()).collect(),
        close_to_tray: settings.ui.close_to_tray,
        start_at_login: studio_worker::platform::autostart::is_enabled(),
        save_copies_to: None,
        send_crash_reports: false,
        policy: settings.policy.clone(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unticked_model_is_no_longer_fetched_shown_advertised_or_served() {
    // A download that cannot go on (gated) is shown and announced as coming…
    let (hub_setup, studio, home, runtime) = a_worker_whose_download_is_gated().await;
    let handle = runtime.handle();
    eventually("announced as coming", PATIENCE, || {
        advertised(&studio) == Some(serde_json::json!([{ "id": "tiny", "ready": false }]))
    })
    .await;
    // …until it is unticked: then neither.
    assert!(handle.send(ticking(&handle, &[])));
    eventually("no longer shown or announced", PATIENCE, || {
        handle.status().downloads.is_empty() && advertised(&studio) == Some(serde_json::json!([]))
    })
    .await;

    // Ticked again with the hub open: fetched, served, advertised.
    hub_setup.hub.gate(REPO, None);
    assert!(handle.send(ticking(&handle, &["tiny"])));
    eventually("served after the download", PATIENCE, || {
        advertised(&studio) == Some(serde_json::json!([{ "id": "tiny", "ready": true }]))
    })
    .await;
    assert_eq!(handle.status().models_ready, Some(vec!["tiny".to_owned()]));

    // Unticked while served: neither advertised nor claimed from the next heartbeat on, and
    // the engine serves it no more (the Status tab says so too).
    assert!(handle.send(ticking(&handle, &[])));
    eventually("no longer advertised", PATIENCE, || {
        advertised(&studio) == Some(serde_json::json!([]))
    })
    .await;
    assert_eq!(handle.status().models_ready, Some(Vec::new()));
    assert!(home.on_disk().models.enabled.is_empty());
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_removed_mid_download_stops_its_transfer_and_leaves_nothing_behind() {
    let hub_setup = setup().await;
    // The UNet's transfer sends 100 KB, then hangs on: a download under way.
    hub_setup.hub.stall_next_transfer(UNET, 100_000);
    let (studio, home) = studio_and_home_enabling(&["tiny"]).await;
    let runtime = start_with_downloads(&home, &hub_setup);
    let handle = runtime.handle();
    until_the_unet_is_fetched(&hub_setup).await;
    eventually("announced as coming", PATIENCE, || {
        advertised(&studio) == Some(serde_json::json!([{ "id": "tiny", "ready": false }]))
    })
    .await;
    // The Status tab shows what arrived before the transfer went quiet, not an older figure.
    eventually("the progress shown is what arrived", PATIENCE, || {
        let sent: u64 = hub_setup
            .hub
            .downloads()
            .iter()
            .map(|download| download.bytes_sent)
            .sum();
        handle.status().downloads.first().map(|d| d.done_bytes) == Some(sent)
    })
    .await;
    // Nothing arrives any more, so no speed or time left is claimed after a few seconds.
    eventually("a quiet transfer claims no speed", 2 * PATIENCE, || {
        handle
            .status()
            .downloads
            .first()
            .is_some_and(|d| d.bytes_per_second == 0.0 && d.eta.is_none())
    })
    .await;

    // Deleted from the window (or `models remove`): unticked, the transfer stopped, and
    // every file gone, the half-fetched one included.
    let note = remove(&handle, "tiny")
        .await
        .expect("removed")
        .expect("says what it freed");
    assert!(note.starts_with("Removed tiny ("), "{note}");
    assert_eq!(hub_setup.store.state(&ENTRY), ModelState::Absent);
    let repo_dir = hub_setup.store.cache().repo_dir(REPO);
    let left: Vec<PathBuf> = if repo_dir.exists() {
        files_under(&repo_dir)
    } else {
        Vec::new()
    };
    assert!(left.is_empty(), "nothing left behind: {left:?}");
    assert!(home.on_disk().models.enabled.is_empty());
    eventually("neither shown nor announced", PATIENCE, || {
        let status = handle.status();
        status.downloads.is_empty()
            && status.models_on_disk.is_empty()
            && advertised(&studio) == Some(serde_json::json!([]))
    })
    .await;

    // Nothing is fetched again meanwhile, and nothing lands after the removal.
    let transfers = hub_setup.hub.downloads().len();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(hub_setup.hub.downloads().len(), transfers);
    assert_eq!(hub_setup.store.state(&ENTRY), ModelState::Absent);
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_models_on_this_pc_are_listed_for_the_window() {
    let hub_setup = setup().await;
    let (_studio, home) = studio_and_home_enabling(&["tiny"]).await;
    let runtime = start_with_downloads(&home, &hub_setup);
    let handle = runtime.handle();
    eventually("listed once downloaded", PATIENCE, || {
        let ModelState::Ready { bytes, .. } = hub_setup.store.state(&ENTRY) else {
            return false;
        };
        handle.status().models_on_disk
            == vec![studio_worker::runtime::ModelOnDisk {
                model_id: "tiny".into(),
                bytes,
                complete: true,
            }]
    })
    .await;
    // `models remove` and `models pull` from the terminal (here without the worker's
    // knowledge): the list follows within a refresh.
    hub_setup.store.remove(&ENTRY).unwrap();
    eventually("gone from the list", PATIENCE, || {
        handle.status().models_on_disk.is_empty()
    })
    .await;
    pull(&hub_setup).await.0.expect("pulls");
    eventually("back in the list", PATIENCE, || {
        handle.status().models_on_disk.len() == 1
    })
    .await;
    runtime.shutdown().await;

    // A download stopped part way is listed as such at the next start.
    let snapshot = hub_setup.store.ready_path(&ENTRY).unwrap();
    std::fs::remove_file(snapshot.join(UNET)).unwrap();
    let (_studio, home) = studio_and_home_enabling(&[]).await;
    let runtime = start_with_downloads(&home, &hub_setup);
    let handle = runtime.handle();
    eventually("listed as a stopped download", PATIENCE, || {
        handle
            .status()
            .models_on_disk
            .iter()
            .any(|on_disk| on_disk.model_id == "tiny" && !on_disk.complete)
    })
    .await;
    runtime.shutdown().await;

    // Another tool's download of the same repository (the cache as it is, without this
    // worker's lists of its files) is not the worker's to delete: neither listed nor removed.
    let data_dir = tempfile::tempdir().unwrap();
    let theirs = ModelStore::new(hub_setup.store.cache().clone(), data_dir.path());
    assert!(matches!(theirs.state(&ENTRY), ModelState::Partial { .. }));
    assert_eq!(theirs.own_files(&ENTRY), None);
    assert_eq!(theirs.remove(&ENTRY).unwrap(), 0);
    assert!(
        hub_setup.store.own_files(&ENTRY).is_some(),
        "all still there"
    );
}

/// One runtime thread (the default for `tokio::test`): anything that blocks it stalls every
/// task of the worker, the lease renewals of a running job first.
#[tokio::test]
async fn a_running_jobs_lease_renewals_keep_their_cadence_while_a_large_download_is_verified() {
    const BIG: u64 = 1 << 30;
    let hub_setup = setup().await;
    // A gigabyte of weights (zeros, so neither the hub's copy nor the cache's costs memory or
    // disk), already transferred whole: only hashing it remains.
    let hashing = std::time::Instant::now();
    hub_setup.hub.put_file(REPO, UNET, vec![0; BIG as usize]);
    // The hub hashed it twice (SHA-256 and git's SHA-1); the worker's verify is about half.
    let verify_takes = hashing.elapsed() / 2;
    let partial = hub_setup
        .store
        .cache()
        .incomplete_path(REPO, &hub_setup.hub.file_sha256(REPO, UNET));
    std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
    std::fs::File::create(&partial)
        .unwrap()
        .set_len(BIG)
        .unwrap();

    let (studio, home) = studio_and_home_enabling(&[]).await;
    let engine = Arc::new(crate::support::engine::ScriptedEngine::new(
        std::time::Duration::from_millis(40),
    ));
    let runtime = Runtime::start(
        home.shared(),
        RuntimeOptions {
            timing: fast_timing(),
            data_dir: home.dir.path().to_path_buf(),
            api_base_override: None,
            engine: Some(engine),
            recovered_config: None,
            model_supply: Some(ModelSupply {
                store: hub_setup.store.clone(),
                hub: hub_setup.client.clone(),
                catalog: vec![ENTRY],
            }),
            probes: None,
            tolerate_invalid_studio_url: false,
            gpu_recovery: Default::default(),
        },
    )
    .unwrap();
    let handle = runtime.handle();

    // A job of 150 steps, 40 ms each: a progress report (a lease renewal) every step.
    let mut job = serde_json::json!({
        "jobId": "j_long", "kind": "txt2img", "model": "sd-turbo", "prompt": "a lighthouse",
        "width": 64, "height": 64, "steps": 150, "guidanceScale": 0.0, "seed": 1,
        "numImages": 1, "leaseS": 120
    });
    studio.enqueue(job.take());
    eventually("denoising", PATIENCE, || {
        studio
            .job("j_long")
            .is_some_and(|j| j.progress.iter().any(|p| p["step"].as_u64() >= Some(2)))
    })
    .await;
    handle
        .config()
        .update(|config| config.models.enabled = vec!["tiny".to_owned()])
        .unwrap();
    eventually("the download verified and settled", PATIENCE, || {
        !partial.exists()
    })
    .await;
    eventually("delivered", PATIENCE, || {
        studio.job("j_long").is_some_and(|j| j.uploads > 0)
    })
    .await;
    runtime.shutdown().await;

    // Every report while the job ran (denoising only: the verify happened in that time).
    let reports: Vec<std::time::Instant> = studio
        .log_for(Route::Progress)
        .iter()
        .filter(|request| request.body["stage"] == "denoising")
        .map(|request| request.at)
        .collect();
    let longest_gap = reports
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap();
    let allowed = (verify_takes / 2).max(std::time::Duration::from_millis(250));
    assert!(
        longest_gap < allowed,
        "no lease renewal for {longest_gap:?} while the verify took ~{verify_takes:?}"
    );
}

//! The outbox against a hostile studio: a result leaves the PC only on the studio's word.
//! `404` and other `4xx` keep it (retried, then given up on after the limit, or discarded by
//! the person), files that cannot be read are kept and shown, an entry that cannot be
//! removed is never uploaded in a loop, leases are renewed while results wait, the next jobs
//! run while a large result uploads, claims stop while the outbox is full or cannot be read.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use studio_worker::runtime::{Command, Runtime, WaitingState};

use crate::support::engine::ScriptedEngine;
use crate::support::studio::{Fault, JobState, Route, TestStudio, job_body};
use crate::support::{
    PATIENCE, WorkerHome, approved_worker, claims_held_saying, eventually, fast_timing,
    waiting_state,
};

struct Rig {
    studio: TestStudio,
    home: WorkerHome,
    _engine: Arc<ScriptedEngine>,
    runtime: Runtime,
}

impl Rig {
    async fn start(timing: studio_worker::timing::Timing) -> Self {
        let (studio, home, engine, runtime) =
            approved_worker(Duration::from_millis(1), timing).await;
        Self {
            studio,
            home,
            _engine: engine,
            runtime,
        }
    }

    fn outbox(&self) -> std::path::PathBuf {
        self.home.dir.path().join("outbox")
    }

    /// The outbox's entry folders (not temp or trash).
    fn entries(&self) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(self.outbox())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
            .map(|entry| entry.path())
            .collect()
    }

    fn waiting_state(&self, job_id: &str) -> Option<WaitingState> {
        waiting_state(&self.runtime.handle(), job_id)
    }

    async fn in_outbox(&self, job_id: &str) {
        let handle = self.runtime.handle();
        eventually(&format!("{job_id} in the outbox"), PATIENCE, || {
            handle
                .status()
                .jobs
                .waiting
                .iter()
                .any(|result| result.job_id == job_id)
        })
        .await;
    }

    async fn delivered(&self, job_id: &str) {
        crate::support::delivered(&self.studio, job_id).await;
    }
}

/// Upload requests for `job_id` the studio received (answered or refused).
fn uploads(studio: &TestStudio, job_id: &str) -> usize {
    studio
        .log_for(Route::Result)
        .iter()
        .filter(|request| request.path.contains(&format!("/{job_id}/")))
        .count()
}

fn job(job_id: &str) -> Value {
    job_body(job_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_on_upload_keeps_the_result_and_retries_until_the_studio_takes_it() {
    let rig = Rig::start(fast_timing()).await;
    rig.studio
        .inject(Some(Route::Result), Fault::Status(404), 3);
    rig.studio.enqueue(job("j_404"));
    eventually("refused and kept, with the studio's answer", PATIENCE, || {
        matches!(
            rig.waiting_state("j_404"),
            Some(WaitingState::Refused { ref studio_answer, .. }) if studio_answer.contains("404")
        ) || rig.studio.job("j_404").is_some_and(|job| !job.results.is_empty())
    })
    .await;
    rig.delivered("j_404").await;
    let job = rig.studio.job("j_404").unwrap();
    assert!(
        uploads(&rig.studio, "j_404") >= 4,
        "three 404s, then the upload that landed"
    );
    assert!(job.fails.is_empty(), "never reported failed");
    assert_eq!(job.results.len(), 1);
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_result_is_given_up_only_after_the_limit_and_then_reported_failed() {
    let mut timing = fast_timing();
    timing.give_up_refused_upload_after = Duration::from_millis(600);
    let rig = Rig::start(timing).await;
    rig.studio
        .inject(Some(Route::Result), Fault::Status(400), u32::MAX);
    rig.studio.enqueue(job("j_400"));
    rig.in_outbox("j_400").await;
    let entry = rig.entries().pop().unwrap();
    eventually("reported failed after the limit", PATIENCE, || {
        rig.studio
            .job("j_400")
            .is_some_and(|job| !job.fails.is_empty())
    })
    .await;
    let job = rig.studio.job("j_400").unwrap();
    let tries = uploads(&rig.studio, "j_400");
    assert!(tries >= 2, "retried before giving up ({tries})");
    assert_eq!(job.fails[0]["code"], "internal");
    assert!(
        job.fails[0]["error"]
            .as_str()
            .unwrap()
            .contains("refused the result"),
        "{}",
        job.fails[0]
    );
    // Taken out (the studio re-queued the job for another try: a new result may come).
    eventually("taken out of the outbox", PATIENCE, || !entry.exists()).await;
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_person_may_discard_a_refused_result() {
    let rig = Rig::start(fast_timing()).await;
    rig.studio
        .inject(Some(Route::Result), Fault::Status(404), u32::MAX);
    rig.studio.enqueue(job("j_discard"));
    eventually("refused and kept", PATIENCE, || {
        matches!(
            rig.waiting_state("j_discard"),
            Some(WaitingState::Refused { .. })
        )
    })
    .await;
    let key = rig
        .runtime
        .handle()
        .status()
        .jobs
        .waiting
        .iter()
        .find(|result| result.job_id == "j_discard")
        .unwrap()
        .key
        .clone();
    let entry = rig.outbox().join(&key);
    assert!(entry.exists());
    assert!(rig.runtime.handle().send(Command::DiscardResult { key }));
    eventually("reported failed and removed", PATIENCE, || {
        rig.studio
            .job("j_discard")
            .is_some_and(|job| !job.fails.is_empty())
            && !entry.exists()
    })
    .await;
    let fail = rig.studio.job("j_discard").unwrap().fails[0].clone();
    assert_eq!(fail["code"], "internal");
    assert!(
        fail["error"].as_str().unwrap().contains("discarded"),
        "{fail}"
    );
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_whose_files_cannot_be_read_is_kept_and_the_others_flow() {
    let rig = Rig::start(fast_timing()).await;
    rig.studio
        .inject(Some(Route::Result), Fault::Status(503), u32::MAX);
    rig.studio.enqueue(job("j_broken"));
    rig.in_outbox("j_broken").await;
    let entry = rig.entries().pop().unwrap();
    std::fs::remove_file(entry.join("image-0.png")).unwrap();
    // The studio keeps refusing until the damage is seen: an attempt that read the image just
    // before it went would otherwise deliver it once the studio answers again.
    assert!(rig.runtime.handle().send(Command::RetryUploads));
    eventually("kept and shown as unreadable", PATIENCE, || {
        matches!(
            rig.waiting_state("j_broken"),
            Some(WaitingState::Unreadable { .. })
        )
    })
    .await;
    rig.studio.clear_faults();
    rig.studio.enqueue(job("j_next"));
    rig.delivered("j_next").await;
    assert!(entry.exists(), "the damaged result is kept for the person");
    assert!(
        rig.studio.job("j_broken").unwrap().fails.is_empty(),
        "not failed by the worker on its own"
    );
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_that_cannot_be_removed_after_delivery_is_not_uploaded_again_and_retry_removes_it()
{
    let rig = Rig::start(fast_timing()).await;
    rig.studio
        .inject(Some(Route::Result), Fault::Status(503), u32::MAX);
    rig.studio.enqueue(job("j_stuck"));
    rig.in_outbox("j_stuck").await;
    let entry = rig.entries().pop().unwrap();
    // Where the removal would move it already holds something: the rename fails (as it
    // would on a file system that refuses it; root ignores permissions).
    let trash = rig.outbox().join(format!(
        ".trash-{}",
        entry.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(trash.join("occupied")).unwrap();
    rig.studio.clear_faults();
    assert!(rig.runtime.handle().send(Command::RetryUploads));
    rig.delivered("j_stuck").await;
    eventually("kept aside as delivered", PATIENCE, || {
        rig.waiting_state("j_stuck") == Some(WaitingState::DeliveredNotRemoved)
    })
    .await;
    rig.studio.enqueue(job("j_after"));
    rig.delivered("j_after").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rig.studio.job("j_stuck").unwrap().uploads,
        1,
        "uploaded once, not again in a loop"
    );
    // The person clears the way and retries: the removal is tried again, not the upload.
    std::fs::remove_dir_all(&trash).unwrap();
    assert!(rig.runtime.handle().send(Command::RetryUploads));
    eventually("taken out on Retry now", PATIENCE, || {
        !entry.exists() && rig.waiting_state("j_stuck").is_none()
    })
    .await;
    assert_eq!(rig.studio.job("j_stuck").unwrap().uploads, 1);
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_renewed_while_results_wait_and_a_cancel_drops_one() {
    let rig = Rig::start(fast_timing()).await;
    rig.studio
        .inject(Some(Route::Result), Fault::Status(503), u32::MAX);
    // The shortest lease the protocol allows a worker to keep: renewed every ~3 s.
    for job_id in ["j_wait", "j_cancelled"] {
        let mut body = job(job_id);
        body["leaseS"] = json!(10);
        rig.studio.enqueue(body);
    }
    rig.in_outbox("j_wait").await;
    rig.in_outbox("j_cancelled").await;

    // The submitter cancels one: the next renewal hears it, and the result is dropped.
    rig.studio.cancel_job("j_cancelled");
    eventually("the cancelled result dropped", PATIENCE, || {
        rig.waiting_state("j_cancelled").is_none()
    })
    .await;

    // The other waits longer than its 10 s lease: renewed all along, never re-queued, even
    // though three renewals in a row fail (each is tried again soon, not a third later).
    rig.studio
        .inject(Some(Route::Progress), Fault::Status(503), 3);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let waiting = rig.studio.job("j_wait").unwrap();
    assert!(
        matches!(waiting.state, JobState::Leased { .. }),
        "still this worker's: {:?}",
        waiting.state
    );
    let renewals = waiting
        .progress
        .iter()
        .filter(|p| p["stage"] == "uploading")
        .count();
    assert!(renewals >= 4, "renewed every ~3 s: {renewals}");
    rig.studio.clear_faults();
    rig.delivered("j_wait").await;
    assert_eq!(rig.studio.job("j_wait").unwrap().leases, 1);
    assert!(rig.studio.job("j_cancelled").unwrap().results.is_empty());
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_stop_while_20_results_wait_and_start_again_when_they_are_delivered() {
    let rig = Rig::start(fast_timing()).await;
    rig.studio
        .inject(Some(Route::Result), Fault::Status(503), u32::MAX);
    for n in 0..25 {
        rig.studio.enqueue(job(&format!("j_full_{n:02}")));
    }
    let handle = rig.runtime.handle();
    claims_held_saying(&handle, "20 finished results").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(handle.status().jobs.outbox_len, 20, "no more than 20");
    let queued = rig
        .studio
        .jobs()
        .iter()
        .filter(|job| job.state == JobState::Queued)
        .count();
    assert_eq!(queued, 5, "the rest stay at the studio");

    rig.studio.clear_faults();
    assert!(handle.send(Command::RetryUploads));
    for n in 0..25 {
        rig.delivered(&format!("j_full_{n:02}")).await;
    }
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_jobs_run_while_a_large_result_crawls_up_a_slow_uplink() {
    let rig = Rig::start(fast_timing()).await;
    // ≈2 Mbit/s up: a 512² image of noise (≈0.8 MB) takes about 3 s.
    rig.studio.set_uplink(Some(256 * 1024));
    let mut large = job("j_large");
    large["prompt"] = json!("a lighthouse at dusk #noise");
    large["width"] = json!(512);
    large["height"] = json!(512);
    rig.studio.enqueue(large);
    let next = ["j_next_1", "j_next_2", "j_next_3"];
    for job_id in next {
        rig.studio.enqueue(job(job_id));
    }
    let handle = rig.runtime.handle();
    eventually(
        "the next jobs finished behind the large upload",
        PATIENCE,
        || {
            let waiting = handle.status().jobs.waiting;
            next.iter()
                .all(|job_id| waiting.iter().any(|result| result.job_id == *job_id))
        },
    )
    .await;
    assert!(
        rig.studio.job("j_large").unwrap().results.is_empty(),
        "the large result was still on its way"
    );
    rig.delivered("j_large").await;
    for job_id in next {
        rig.delivered(job_id).await;
    }
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_does_not_hold_the_lease_renewals_of_the_results_behind_it() {
    let rig = Rig::start(fast_timing()).await;
    // ≈1 Mbit/s up: a 1024² image of noise (≈3 MB) takes about 24 s, over two 10 s leases.
    rig.studio.set_uplink(Some(128 * 1024));
    let mut large = job("j_large");
    large["prompt"] = json!("a lighthouse at dusk #noise");
    large["width"] = json!(1024);
    large["height"] = json!(1024);
    large["leaseS"] = json!(10);
    rig.studio.enqueue(large);
    // Twelve results wait behind it and their submitters cancel them: each renewal of each
    // one (every ~3 s) hears the cancel while the uploader is busy with the large one, more
    // verdicts than the uploader's channel holds before the large upload ends.
    let behind: Vec<String> = (0..12).map(|n| format!("j_behind_{n}")).collect();
    for job_id in &behind {
        let mut body = job(job_id);
        body["leaseS"] = json!(10);
        rig.studio.enqueue(body);
    }
    for job_id in &behind {
        rig.in_outbox(job_id).await;
        rig.studio.cancel_job(job_id);
    }
    eventually(
        "the large result delivered",
        Duration::from_secs(60),
        || {
            rig.studio
                .job("j_large")
                .is_some_and(|job| matches!(job.state, JobState::Done { .. }))
        },
    )
    .await;
    // Its lease was renewed all through the upload: never taken back and run again.
    assert_eq!(rig.studio.job("j_large").unwrap().leases, 1);
    eventually("the cancelled results dropped", PATIENCE, || {
        behind
            .iter()
            .all(|job_id| rig.waiting_state(job_id).is_none())
    })
    .await;
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_that_cannot_be_read_holds_claims() {
    let rig = Rig::start(fast_timing()).await;
    rig.studio.enqueue(job("j_before"));
    rig.delivered("j_before").await;
    // The outbox folder is gone and a file stands in its place: it cannot be listed.
    std::fs::remove_dir_all(rig.outbox()).unwrap();
    std::fs::write(rig.outbox(), b"not a folder").unwrap();
    let handle = rig.runtime.handle();
    assert!(handle.send(Command::RetryUploads));
    claims_held_saying(&handle, "outbox cannot be read").await;
    rig.studio.enqueue(job("j_held"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rig.studio.job("j_held").unwrap().state,
        JobState::Queued,
        "not claimed while results could be unseen"
    );
    rig.runtime.shutdown().await;
}

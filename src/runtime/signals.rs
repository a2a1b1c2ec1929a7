//! The signals tasks send each other, each on its own channel with one owner, so that what
//! the window shows ([`super::WorkerStatus`]) can never change what goes over the wire or
//! when jobs are claimed.
//!
//! | signal | owner (writer) | readers |
//! |---|---|---|
//! | [`OutboxState`] | uploader | job loop (claims wait for the first offers, and while the outbox is full or unreadable) |
//! | models still downloading | downloads task | capabilities (registration, heartbeat) |
//! | the running job's id | job loop | heartbeat (`currentJobId`, `state`) |
//! | [`Tally`] | job loop (engine results), uploader (deliveries) | heartbeat (`stats`) |
//! | [`HostRequests`] | commands task (raise, quit), registration task (fatal) | the window, the headless loop |

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use super::status::JobCounters;

/// The outbox as the uploader last saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboxState {
    /// Results on disk waiting for the studio.
    pub waiting: usize,
    pub bytes: u64,
    /// Why the job loop must not claim now: results from before are offered first (§3.3),
    /// or the outbox cannot be read. `None`: claim away (if it is not full).
    pub hold_claims: Option<String>,
    /// The outbox's stores this count covers ([`crate::outbox::Listing::stores_counted`]):
    /// a result whose store number is at most this is counted in `waiting`.
    pub stores_counted: u64,
}

/// Claims stop while this many results wait, or this many bytes.
pub const MAX_WAITING_RESULTS: usize = 20;
pub const MAX_WAITING_BYTES: u64 = 500 * 1000 * 1000;

/// What the worker has done since start, as the heartbeat's `stats` report it (§2).
#[derive(Debug, Default)]
pub struct Tally {
    jobs_completed: AtomicU64,
    jobs_failed: AtomicU64,
    images_generated: AtomicU64,
    /// Engine time of the last finished job plus one; 0: none yet.
    last_job_ms_plus_one: AtomicU64,
}

impl Tally {
    pub fn delivered(&self, images: u64) {
        self.jobs_completed.fetch_add(1, Ordering::Relaxed);
        self.images_generated.fetch_add(images, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.jobs_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished_in(&self, engine_ms: u64) {
        self.last_job_ms_plus_one
            .store(engine_ms.saturating_add(1), Ordering::Relaxed);
    }

    pub fn counters(&self) -> JobCounters {
        JobCounters {
            jobs_completed: self.jobs_completed.load(Ordering::Relaxed),
            jobs_failed: self.jobs_failed.load(Ordering::Relaxed),
            images_generated: self.images_generated.load(Ordering::Relaxed),
            last_job_ms: match self.last_job_ms_plus_one.load(Ordering::Relaxed) {
                0 => None,
                plus_one => Some(plus_one - 1),
            },
        }
    }
}

/// Why the runtime wants to stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopRequest {
    /// `studio-worker quit` (an installer about to replace the program).
    Quit,
    /// A task hit something it cannot get past (no entropy, say); the reason in one line.
    Fatal(String),
    /// The GPU stopped working in this process: stop, then start the worker again
    /// (`runtime::gpu_recovery`).
    Restart(RestartRequest),
}

/// Start the worker again, once stopped: why, and the variables the new one gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartRequest {
    pub reason: String,
    pub variables: Vec<(String, String)>,
}

/// What the runtime asks of whoever hosts it (the window, or the headless loop): bring the
/// window forward (another launch wanted it), or stop.
#[derive(Clone, Debug)]
pub struct HostRequests {
    raise_window: watch::Receiver<u64>,
    stop: watch::Receiver<Option<StopRequest>>,
}

/// The runtime's side of [`HostRequests`].
#[derive(Clone, Debug)]
pub struct HostRequestSender {
    raise_window: Arc<watch::Sender<u64>>,
    stop: Arc<watch::Sender<Option<StopRequest>>>,
}

/// A fresh pair: the runtime keeps the sender; hosts (and view tests) read the requests.
pub fn host_requests() -> (HostRequestSender, HostRequests) {
    let (raise_sender, raise_window) = watch::channel(0);
    let (stop_sender, stop) = watch::channel(None);
    (
        HostRequestSender {
            raise_window: Arc::new(raise_sender),
            stop: Arc::new(stop_sender),
        },
        HostRequests { raise_window, stop },
    )
}

impl HostRequestSender {
    pub fn raise_window(&self) {
        self.raise_window.send_modify(|count| *count += 1);
    }

    /// Asks the host to stop; the first request wins.
    pub fn stop(&self, request: StopRequest) {
        self.stop.send_if_modified(|stop| {
            if stop.is_some() {
                return false;
            }
            *stop = Some(request);
            true
        });
    }
}

impl HostRequests {
    /// How many times the window was asked to come forward; it raises itself when this grows.
    pub fn window_raises(&self) -> u64 {
        *self.raise_window.borrow()
    }

    /// Whether (and why) the runtime asked to stop.
    pub fn stop_request(&self) -> Option<StopRequest> {
        self.stop.borrow().clone()
    }

    /// Resolves when the runtime asks to stop, with why.
    pub async fn stopped(&self) -> StopRequest {
        let mut stop = self.stop.clone();
        loop {
            if let Some(request) = stop.borrow_and_update().clone() {
                return request;
            }
            if stop.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves when either request changes (the window's wake-up).
    pub async fn changed(&mut self) {
        tokio::select! {
            () = super::changed(&mut self.raise_window) => {}
            () = super::changed(&mut self.stop) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_counts_and_remembers_the_last_time() {
        let tally = Tally::default();
        assert_eq!(tally.counters(), JobCounters::default());
        tally.finished_in(0);
        tally.delivered(3);
        tally.failed();
        let counters = tally.counters();
        assert_eq!(
            (
                counters.jobs_completed,
                counters.images_generated,
                counters.jobs_failed
            ),
            (1, 3, 1)
        );
        assert_eq!(counters.last_job_ms, Some(0), "0 ms is a time, not none");
    }

    #[tokio::test]
    async fn the_first_stop_request_wins() {
        let (sender, requests) = host_requests();
        assert_eq!(requests.stop_request(), None);
        sender.stop(StopRequest::Fatal("no entropy".into()));
        sender.stop(StopRequest::Quit);
        assert_eq!(
            requests.stopped().await,
            StopRequest::Fatal("no entropy".into())
        );
        sender.raise_window();
        assert_eq!(requests.window_raises(), 1);
    }
}

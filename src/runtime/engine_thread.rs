//! The one thread the engine's work runs on: preparing the GPU, the jobs, unloading, in the
//! order the job loop asks, for the worker's lifetime.
//!
//! Not the blocking pool's threads, which come and go: candle keeps state per thread on
//! CUDA (its cache of the small uploads a kernel's dims and strides need), and the CUDA
//! graphs kept from job to job (the UNet's, the text encoders') read what the capturing
//! thread cached. On one thread every job finds them (`engine::sd::step_graph`).

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

type Work = Box<dyn FnOnce() + Send>;

/// Runs closures one at a time on a thread of its own; the thread ends when this is dropped
/// (after the work it was given).
pub(super) struct EngineThread {
    work: mpsc::Sender<Work>,
}

/// Why the engine thread gave no result.
#[derive(Debug, thiserror::Error)]
pub(super) enum EngineThreadError {
    #[error("the engine crashed")]
    Panicked,
    #[error("the engine's thread is gone")]
    Gone,
}

impl EngineThread {
    pub(super) fn start() -> std::io::Result<Self> {
        let (work, queue) = mpsc::channel::<Work>();
        std::thread::Builder::new()
            .name("engine".to_owned())
            .spawn(move || {
                for work in queue {
                    work();
                }
            })?;
        Ok(Self { work })
    }

    /// Runs `work` on the engine's thread, after what it was given before. A panic in it is
    /// caught (the thread goes on) and reported as [`EngineThreadError::Panicked`].
    pub(super) async fn run<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, EngineThreadError> {
        let (done, result) = tokio::sync::oneshot::channel();
        let wrapped: Work = Box::new(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(work));
            // The caller may have stopped waiting (shutting down): nothing to tell then.
            let _ = done.send(outcome);
        });
        self.work
            .send(wrapped)
            .map_err(|_| EngineThreadError::Gone)?;
        match result.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_panic)) => Err(EngineThreadError::Panicked),
            Err(_) => Err(EngineThreadError::Gone),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_one_named_thread_that_outlives_a_panic() {
        let thread = EngineThread::start().unwrap();
        let first = thread.run(|| std::thread::current().id()).await.unwrap();
        let name = thread
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("engine"));
        assert_ne!(first, std::thread::current().id());

        let panicked = thread.run(|| panic!("a bug in the engine")).await;
        assert!(matches!(panicked, Err(EngineThreadError::Panicked)));
        let after = thread.run(|| std::thread::current().id()).await.unwrap();
        assert_eq!(after, first, "the same thread, still there");
    }
}

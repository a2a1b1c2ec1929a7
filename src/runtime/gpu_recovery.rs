//! What the worker does when its GPU stops working in the middle of a run.
//!
//! Some faults leave the process's CUDA context unusable for good: an illegal memory access
//! in a kernel, or a driver reset (Windows resets the GPU when a game hangs it, and every
//! program's context goes with it). Every later CUDA call fails the same way; NVIDIA's rule
//! is that the process must start again. So the job loop fails the job (`internal`,
//! retryable: another worker takes it) and asks its host to start the worker again, once
//! the runtime has stopped (`cli`: the same program with the same arguments, in the tray).
//!
//! A driver reset is a one-off, and a restart gets past it. A fault that comes back within
//! [`WINDOW`] of a restart is taken for ours (a kernel of `engine::kernels`, or a CUDA
//! graph): the next restart turns them off. A third fault that soon stops taking jobs,
//! and says why, until the person restarts the worker; results already made still go out.
//! The chain of restarts travels in [`VARIABLE`], from a worker to the one it starts.

use std::time::Duration;

/// Where a restarted worker finds its chain of restarts: `<restarts>:<unix seconds of the
/// last>:<why the GPU was lost>`.
pub const VARIABLE: &str = "STUDIO_WORKER_GPU_RESTARTS";

/// Faults closer together than this are one problem, not several driver resets.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);

/// The restarts that led to this process, when it was started for a lost GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuRecovery {
    /// Restarts in a row, each within [`WINDOW`] of the one before.
    restarts: u32,
    /// When the last one happened, in seconds since the Unix epoch.
    last_at: u64,
    /// Why the GPU was lost then.
    reason: String,
}

/// What the status says about the restart that started this process.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Restarted {
    pub at: chrono::DateTime<chrono::Utc>,
    /// Why the GPU was lost.
    pub reason: String,
    /// Our kernels and CUDA graphs are off in this process (a fault came back).
    pub kernels_off: bool,
}

/// What to do about a lost GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Start the worker again, with these variables set.
    Restart(Vec<(String, String)>),
    /// Take no more jobs in this run; the reason for the status.
    Stop(String),
}

impl Restarted {
    /// "Started again 3 min ago: the GPU stopped working (…)", and what that turned off.
    pub fn describe(&self, now: chrono::DateTime<chrono::Utc>) -> String {
        let mut text = format!(
            "Started again {}: the GPU stopped working ({})",
            crate::human::ago(self.at, now),
            self.reason
        );
        if self.kernels_off {
            text.push_str(
                ". It did twice: this worker's own GPU kernels and CUDA graphs are off until \
                 studio-worker is restarted",
            );
        }
        text
    }
}

impl GpuRecovery {
    /// This process's chain, from [`VARIABLE`] (none when unset or unreadable).
    pub fn from_environment() -> Self {
        std::env::var(VARIABLE)
            .ok()
            .and_then(|value| Self::parse(&value))
            .unwrap_or_default()
    }

    /// The chain [`VARIABLE`]'s `value` describes.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.splitn(3, ':');
        Some(Self {
            restarts: parts.next()?.trim().parse().ok()?,
            last_at: parts.next()?.trim().parse().ok()?,
            reason: parts.next().unwrap_or_default().to_owned(),
        })
    }

    /// The restart that started this process, for the status (`None`: a fresh start).
    pub fn restarted(&self) -> Option<Restarted> {
        if self.restarts == 0 {
            return None;
        }
        Some(Restarted {
            at: chrono::DateTime::from_timestamp(i64::try_from(self.last_at).ok()?, 0)?,
            reason: self.reason.clone(),
            kernels_off: self.restarts >= 2,
        })
    }

    /// What to do about the GPU lost `now` (Unix seconds) for `why`.
    pub fn next(&self, now: u64, why: &str) -> Next {
        let recent = self.restarts > 0 && now.saturating_sub(self.last_at) < WINDOW.as_secs();
        let restarts = if recent { self.restarts } else { 0 };
        let chain = (VARIABLE.to_owned(), format!("{}:{now}:{why}", restarts + 1));
        match restarts {
            0 => Next::Restart(vec![chain]),
            1 => {
                let off = |variable: &str| (variable.to_owned(), "0".to_owned());
                Next::Restart(vec![
                    chain,
                    off(crate::engine::kernels::SWITCH),
                    off(crate::engine::sd::STEP_GRAPHS_SWITCH),
                ])
            }
            _ => Next::Stop(format!(
                "the GPU stopped working again ({why}), {restarts} times since {} ago; \
                 no more jobs until studio-worker is restarted",
                crate::human::duration(Duration::from_secs(now.saturating_sub(self.last_at)))
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn restart_variables(next: &Next) -> Vec<(&str, &str)> {
        match next {
            Next::Restart(variables) => variables
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect(),
            Next::Stop(why) => panic!("stopped: {why}"),
        }
    }

    #[test]
    fn a_first_loss_restarts_as_it_was() {
        let next = GpuRecovery::default().next(NOW, "CUDA_ERROR_LAUNCH_TIMEOUT");
        assert_eq!(
            restart_variables(&next),
            [(VARIABLE, "1:1800000000:CUDA_ERROR_LAUNCH_TIMEOUT")]
        );
    }

    #[test]
    fn a_loss_soon_after_a_restart_restarts_without_our_kernels_and_graphs() {
        let chain = GpuRecovery::parse("1:1800000000:CUDA_ERROR_LAUNCH_TIMEOUT").unwrap();
        let next = chain.next(NOW + 60, "CUDA_ERROR_ILLEGAL_ADDRESS");
        assert_eq!(
            restart_variables(&next),
            [
                (VARIABLE, "2:1800000060:CUDA_ERROR_ILLEGAL_ADDRESS"),
                ("STUDIO_WORKER_FUSED_KERNELS", "0"),
                ("STUDIO_WORKER_CUDA_GRAPHS", "0"),
            ]
        );
        // Those read the same variables, and take "0" as off.
        assert!(crate::engine::kernels::switched_off("0"));
    }

    #[test]
    fn a_third_loss_that_soon_stops_taking_jobs() {
        let chain = GpuRecovery::parse("2:1800000000").unwrap();
        match chain.next(NOW + 300, "CUDA_ERROR_ILLEGAL_ADDRESS") {
            Next::Stop(why) => assert_eq!(
                why,
                "the GPU stopped working again (CUDA_ERROR_ILLEGAL_ADDRESS), 2 times since 5 \
                 min ago; no more jobs until studio-worker is restarted"
            ),
            restart => panic!("{restart:?}"),
        }
    }

    #[test]
    fn a_loss_long_after_the_last_restart_starts_the_chain_over() {
        let chain = GpuRecovery::parse("2:1800000000").unwrap();
        let next = chain.next(NOW + WINDOW.as_secs(), "a driver reset");
        assert_eq!(
            restart_variables(&next),
            [(VARIABLE, "1:1800000900:a driver reset")]
        );
    }

    #[test]
    fn an_unreadable_chain_counts_as_none() {
        for value in ["", "2", "x:1", "1:y", "-1:5"] {
            assert_eq!(GpuRecovery::parse(value), None, "{value:?}");
        }
        assert_eq!(
            GpuRecovery::parse(" 2 : 7 "),
            Some(GpuRecovery {
                restarts: 2,
                last_at: 7,
                reason: String::new(),
            })
        );
    }

    #[test]
    fn a_restarted_worker_knows_when_and_why_and_whether_our_kernels_are_off() {
        assert_eq!(GpuRecovery::default().restarted(), None, "a fresh start");
        let why = "DriverError(CUDA_ERROR_LAUNCH_TIMEOUT, \"the launch timed out: x\")";
        let first = GpuRecovery::parse(&format!("1:1800000000:{why}")).unwrap();
        let restarted = first.restarted().unwrap();
        assert_eq!(restarted.at.timestamp(), 1_800_000_000);
        assert_eq!(restarted.reason, why, "colons and all");
        assert!(!restarted.kernels_off);
        let second = GpuRecovery::parse("2:1800000000:again").unwrap();
        assert!(second.restarted().unwrap().kernels_off);
    }
}

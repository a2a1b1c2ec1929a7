//! Where the engine's time goes, by kind of work, when asked (`generate --profile`): the
//! numbers that say which kernel to write next. Each profiled stretch of model code waits
//! for its device before it starts and before it ends, and adds the time between to its
//! [`Work`]; what no stretch covers (residual adds, casts, embeddings, the waits themselves)
//! is the run's remainder. Waiting costs the GPU its overlap of launches, so a profiled run
//! is slower than a plain one: read the shares, not the sum.
//!
//! Profiling is per thread: the engine runs a job's model code on the thread that called it,
//! and the thread that turned profiling on reads the table. Off (the default) a stretch
//! costs a thread-local read. Stretches inside a stretch are not counted on their own (no
//! time is counted twice).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use candle_core::Device;

/// A kind of work, as the table names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Work {
    TextEncoder,
    Conv3x3,
    Conv1x1,
    GroupNorm,
    LayerNorm,
    Linear,
    /// Scores, softmax and the weighted values (the score matrix's memory traffic).
    Attention,
    /// Splitting into heads and merging them back (copies).
    HeadLayout,
    /// Cells to tokens and back around a transformer (copies).
    TokenLayout,
    Geglu,
    Upsample,
    Sampler,
}

impl Work {
    pub fn label(self) -> &'static str {
        match self {
            Self::TextEncoder => "text encoder",
            Self::Conv3x3 => "conv 3×3",
            Self::Conv1x1 => "conv 1×1",
            Self::GroupNorm => "group norm (+ SiLU)",
            Self::LayerNorm => "layer norm",
            Self::Linear => "linear",
            Self::Attention => "attention: scores, softmax, values",
            Self::HeadLayout => "attention: heads split and merged",
            Self::TokenLayout => "cells ↔ tokens",
            Self::Geglu => "GEGLU",
            Self::Upsample => "upsample",
            Self::Sampler => "sampler step",
        }
    }
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    /// Whether a stretch is open.
    static OPEN: Cell<bool> = const { Cell::new(false) };
    static TOTALS: RefCell<BTreeMap<Work, (Duration, u64)>> = const { RefCell::new(BTreeMap::new()) };
}

/// Turns profiling on or off for this thread.
pub fn set_enabled(enabled: bool) {
    ENABLED.with(|on| on.set(enabled));
}

/// Starts timing `work` on `device`; the time counts when the returned guard drops.
pub fn stretch(work: Work, device: &Device) -> Stretch {
    if !ENABLED.with(Cell::get) || OPEN.with(Cell::get) {
        return Stretch { open: None };
    }
    wait_for(device);
    OPEN.with(|open| open.set(true));
    Stretch {
        open: Some((work, device.clone(), Instant::now())),
    }
}

/// `run()`, its time counted as `work` on `device`.
pub fn timed<T>(work: Work, device: &Device, run: impl FnOnce() -> T) -> T {
    let _stretch = stretch(work, device);
    run()
}

/// An open stretch of profiled work (or nothing, when profiling is off).
#[must_use = "the stretch ends when this is dropped"]
pub struct Stretch {
    open: Option<(Work, Device, Instant)>,
}

impl Drop for Stretch {
    fn drop(&mut self) {
        if let Some((work, device, started)) = self.open.take() {
            wait_for(&device);
            let elapsed = started.elapsed();
            OPEN.with(|open| open.set(false));
            TOTALS.with(|totals| {
                let mut totals = totals.borrow_mut();
                let (time, count) = totals.entry(work).or_default();
                *time += elapsed;
                *count += 1;
            });
        }
    }
}

fn wait_for(device: &Device) {
    // A device that cannot synchronise fails the job's next real operation too; here the
    // profile only loses accuracy.
    if let Err(error) = device.synchronize() {
        tracing::debug!("profile: the device did not synchronise: {error}");
    }
}

/// What this thread counted since the last call, and counting starts again.
pub fn take() -> Profile {
    let totals = TOTALS.with(|totals| std::mem::take(&mut *totals.borrow_mut()));
    let mut rows: Vec<(Work, Duration, u64)> = totals
        .into_iter()
        .map(|(work, (time, count))| (work, time, count))
        .collect();
    rows.sort_by_key(|(_, time, _)| std::cmp::Reverse(*time));
    Profile { rows }
}

/// Time per kind of work, the longest first.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub rows: Vec<(Work, Duration, u64)>,
}

impl Profile {
    /// The table for a run that took `total`: per kind, milliseconds, share, calls, and the
    /// remainder.
    pub fn table(&self, total: Duration) -> String {
        let total_ms = total.as_secs_f64() * 1e3;
        let share = |ms: f64| {
            if total_ms > 0.0 {
                100.0 * ms / total_ms
            } else {
                0.0
            }
        };
        let mut out = format!(
            "{:<36} {:>10} {:>6} {:>7} {:>9}\n",
            "work", "ms", "share", "calls", "ms/call"
        );
        let mut counted = 0.0;
        for (work, time, count) in &self.rows {
            let ms = time.as_secs_f64() * 1e3;
            counted += ms;
            let _ = writeln!(
                out,
                "{:<36} {ms:>10.1} {:>5.1}% {count:>7} {:>9.3}",
                work.label(),
                share(ms),
                ms / (*count).max(1) as f64
            );
        }
        let rest = (total_ms - counted).max(0.0);
        let _ = writeln!(
            out,
            "{:<36} {rest:>10.1} {:>5.1}%",
            "everything else (adds, casts, waits)",
            share(rest)
        );
        let _ = write!(out, "{:<36} {total_ms:>10.1}", "run");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stretches_count_once_only_when_on_and_the_table_adds_up() {
        let device = Device::Cpu;
        drop(stretch(Work::Linear, &device));
        assert!(take().rows.is_empty(), "off: nothing is counted");

        set_enabled(true);
        {
            let _outer = stretch(Work::Conv3x3, &device);
            std::thread::sleep(Duration::from_millis(20));
            // Inside an open stretch: not counted on its own.
            let _inner = stretch(Work::GroupNorm, &device);
            std::thread::sleep(Duration::from_millis(5));
        }
        for _ in 0..3 {
            let _linear = stretch(Work::Linear, &device);
        }
        set_enabled(false);
        let profile = take();
        let works: Vec<(Work, u64)> = profile.rows.iter().map(|(w, _, n)| (*w, *n)).collect();
        assert_eq!(works, [(Work::Conv3x3, 1), (Work::Linear, 3)]);
        assert!(profile.rows[0].1 >= Duration::from_millis(25));

        let table = profile.table(Duration::from_millis(100));
        assert!(table.contains("conv 3×3"), "{table}");
        assert!(table.contains("everything else"), "{table}");
        assert!(take().rows.is_empty(), "take starts counting again");
    }
}

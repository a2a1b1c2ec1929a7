//! Where the engine's time goes, by model part and kind of work, when asked (`generate
//! --profile`): the numbers that say which kernel to write next. Each profiled stretch of
//! model code adds its time to its [`Work`]; what no stretch covers (residual adds, casts,
//! embeddings) is the run's remainder.
//!
//! How a stretch is timed depends on the device. On the CPU the work runs as it is called, so
//! the wall clock is the time. On CUDA two events are recorded on the device's stream around
//! the stretch and read only when the profile is taken, so nothing waits for the GPU while
//! the run goes on and a profiled run keeps its speed: a stretch's time is the GPU's, from
//! the work before it finishing to its own last kernel finishing (where the GPU is ahead of
//! the CPU, that is the pace of its launches). Other GPUs (Metal) wait for the device before
//! and after each stretch, which costs the overlap of launches: read the shares there.
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
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, DriverError, sys};

/// The model part a stretch of work belongs to, as the table names it (and an overflow's
/// part, `sd::SdError::NotFinite`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Unet,
    Vae,
}

impl Part {
    pub fn label(self) -> &'static str {
        match self {
            Self::Unet => "UNet",
            Self::Vae => "VAE",
        }
    }
}

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
            Self::Geglu => "GEGLU",
            Self::Upsample => "upsample",
            Self::Sampler => "sampler step",
        }
    }
}

/// Per part and kind: the time, the CPU's time issuing it, the calls.
type Totals = BTreeMap<(Option<Part>, Work), (Duration, Duration, u64)>;

/// A stretch timed on a CUDA stream whose events are not read yet.
#[cfg(feature = "cuda")]
struct Pending {
    part: Option<Part>,
    work: Work,
    span: EndedSpan,
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    /// Whether a stretch is open.
    static OPEN: Cell<bool> = const { Cell::new(false) };
    /// The part being run, if one said so.
    static PART: Cell<Option<Part>> = const { Cell::new(None) };
    static TOTALS: RefCell<Totals> = const { RefCell::new(BTreeMap::new()) };
    #[cfg(feature = "cuda")]
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

/// Counts the stretches until the guard drops as `part`'s (then the part before is back).
pub fn part(part: Part) -> PartGuard {
    PartGuard {
        before: PART.with(|current| current.replace(Some(part))),
    }
}

#[must_use = "the part ends when this is dropped"]
pub struct PartGuard {
    before: Option<Part>,
}

impl Drop for PartGuard {
    fn drop(&mut self) {
        PART.with(|current| current.set(self.before));
    }
}

/// Whether profiling is on for this thread.
pub fn is_enabled() -> bool {
    ENABLED.with(Cell::get)
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
    let Some(clock) = Clock::start(device) else {
        return Stretch { open: None };
    };
    OPEN.with(|open| open.set(true));
    Stretch {
        open: Some((work, clock)),
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
    open: Option<(Work, Clock)>,
}

impl Drop for Stretch {
    fn drop(&mut self) {
        if let Some((work, clock)) = self.open.take() {
            OPEN.with(|open| open.set(false));
            let part = PART.with(Cell::get);
            match clock.stop() {
                Stopped::Took(elapsed) => count(part, work, elapsed, elapsed),
                #[cfg(feature = "cuda")]
                Stopped::Recorded(span) => PENDING.with(|pending| {
                    pending.borrow_mut().push(Pending { part, work, span });
                }),
            }
        }
    }
}

/// How one stretch is being timed.
enum Clock {
    /// The wall clock: the CPU, whose work is done when its call returns.
    Wall(Instant),
    /// The wall clock between waits for the device (a GPU without events here: Metal).
    Waited(Device, Instant),
    /// Events on the CUDA stream, read after the run.
    #[cfg(feature = "cuda")]
    Event(GpuSpan),
}

/// A stretch's time, or the events to read it from later.
enum Stopped {
    Took(Duration),
    #[cfg(feature = "cuda")]
    Recorded(EndedSpan),
}

impl Clock {
    /// `None` where the device cannot be timed (the stretch is then not counted).
    fn start(device: &Device) -> Option<Self> {
        match device {
            Device::Cpu => Some(Self::Wall(Instant::now())),
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => match GpuSpan::start(cuda) {
                Ok(span) => Some(Self::Event(span)),
                Err(error) => {
                    tracing::debug!("profile: no event on the CUDA stream: {error}");
                    None
                }
            },
            _ => {
                wait_for(device);
                Some(Self::Waited(device.clone(), Instant::now()))
            }
        }
    }

    fn stop(self) -> Stopped {
        match self {
            Self::Wall(started) => Stopped::Took(started.elapsed()),
            Self::Waited(device, started) => {
                wait_for(&device);
                Stopped::Took(started.elapsed())
            }
            #[cfg(feature = "cuda")]
            Self::Event(span) => match span.end() {
                Ok(ended) => Stopped::Recorded(ended),
                Err(error) => {
                    tracing::debug!("profile: no event on the CUDA stream: {error}");
                    Stopped::Took(Duration::ZERO)
                }
            },
        }
    }
}

/// A stretch of work on a CUDA device, timed twice: by events on its stream before and after
/// it (the GPU's time) and by the wall clock while the CPU issued it. Nothing waits for the
/// GPU until the ended span is read.
#[cfg(feature = "cuda")]
pub struct GpuSpan {
    stream: std::sync::Arc<CudaStream>,
    started: CudaEvent,
    issuing: Instant,
}

/// A [`GpuSpan`] whose work is issued, its end event recorded.
#[cfg(feature = "cuda")]
pub struct EndedSpan {
    started: CudaEvent,
    ended: CudaEvent,
    /// The CPU's time issuing the work (launches, allocations).
    pub issued: Duration,
}

#[cfg(feature = "cuda")]
impl GpuSpan {
    /// Starts timing the work `cuda` is issued from now.
    pub fn start(cuda: &candle_core::CudaDevice) -> Result<Self, DriverError> {
        let stream = cuda.cuda_stream();
        let started = stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        Ok(Self {
            stream,
            started,
            issuing: Instant::now(),
        })
    }

    /// Ends the span after the work issued so far.
    pub fn end(self) -> Result<EndedSpan, DriverError> {
        let issued = self.issuing.elapsed();
        let ended = self
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        Ok(EndedSpan {
            started: self.started,
            ended,
            issued,
        })
    }
}

#[cfg(feature = "cuda")]
impl EndedSpan {
    /// The GPU's time between the two events, waiting for it to pass the end.
    pub fn gpu_time(&self) -> Result<Duration, DriverError> {
        let ms = self.started.elapsed_ms(&self.ended)?;
        Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
    }
}

fn count(part: Option<Part>, work: Work, elapsed: Duration, issued: Duration) {
    TOTALS.with(|totals| {
        let mut totals = totals.borrow_mut();
        let (time, issuing, count) = totals.entry((part, work)).or_default();
        *time += elapsed;
        *issuing += issued;
        *count += 1;
    });
}

fn wait_for(device: &Device) {
    // A device that cannot synchronise fails the job's next real operation too; here the
    // profile only loses accuracy.
    if let Err(error) = device.synchronize() {
        tracing::debug!("profile: the device did not synchronise: {error}");
    }
}

/// Reads the events of the stretches timed on CUDA into the totals (waiting for the last of
/// them to finish).
#[cfg(feature = "cuda")]
fn read_pending() {
    let pending = PENDING.with(|pending| std::mem::take(&mut *pending.borrow_mut()));
    for Pending { part, work, span } in pending {
        match span.gpu_time() {
            Ok(elapsed) => count(part, work, elapsed, span.issued),
            Err(error) => tracing::debug!("profile: an event pair could not be read: {error}"),
        }
    }
}

/// What this thread counted since the last call, and counting starts again.
pub fn take() -> Profile {
    #[cfg(feature = "cuda")]
    read_pending();
    let totals = TOTALS.with(|totals| std::mem::take(&mut *totals.borrow_mut()));
    let mut rows: Vec<Row> = totals
        .into_iter()
        .map(|((part, work), (time, issued, calls))| Row {
            part,
            work,
            time,
            issued,
            calls,
        })
        .collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.time));
    Profile { rows }
}

/// One part's kind of work in a run.
#[derive(Clone, Debug)]
pub struct Row {
    pub part: Option<Part>,
    pub work: Work,
    /// On the device: the GPU's time between the events around each call (the wall clock on
    /// the CPU).
    pub time: Duration,
    /// The CPU's time issuing the calls (their launches and allocations). Where it is close
    /// to `time` the GPU waited for the CPU; far below it, the CPU ran ahead.
    pub issued: Duration,
    pub calls: u64,
}

/// Time per part and kind of work, the longest first.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub rows: Vec<Row>,
}

impl Profile {
    /// The table for a run that took `total`: per kind, milliseconds, share, the CPU's
    /// milliseconds issuing it, calls, and the remainder.
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
            "{:<41} {:>10} {:>6} {:>10} {:>7} {:>9}\n",
            "work", "ms", "share", "issued ms", "calls", "ms/call"
        );
        let (mut counted, mut issued_sum) = (0.0, 0.0);
        for row in &self.rows {
            let ms = row.time.as_secs_f64() * 1e3;
            let issued = row.issued.as_secs_f64() * 1e3;
            counted += ms;
            issued_sum += issued;
            let label = match row.part {
                Some(part) => format!("{} {}", part.label(), row.work.label()),
                None => row.work.label().to_owned(),
            };
            let _ = writeln!(
                out,
                "{label:<41} {ms:>10.1} {:>5.1}% {issued:>10.1} {:>7} {:>9.3}",
                share(ms),
                row.calls,
                ms / row.calls.max(1) as f64
            );
        }
        let rest = (total_ms - counted).max(0.0);
        let _ = writeln!(
            out,
            "{:<41} {rest:>10.1} {:>5.1}%",
            "everything else (adds, casts, launches)",
            share(rest)
        );
        let _ = writeln!(
            out,
            "{:<41} {counted:>10.1} {:>5.1}% {issued_sum:>10.1}",
            "all counted",
            share(counted)
        );
        let _ = write!(out, "{:<41} {total_ms:>10.1}", "run");
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
            let _vae = part(Part::Vae);
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
        let works: Vec<(Option<Part>, Work, u64)> = profile
            .rows
            .iter()
            .map(|row| (row.part, row.work, row.calls))
            .collect();
        // The part ended with its guard: the linear layers after it belong to none.
        assert_eq!(
            works,
            [(Some(Part::Vae), Work::Conv3x3, 1), (None, Work::Linear, 3)]
        );
        assert!(profile.rows[0].time >= Duration::from_millis(25));
        // On the CPU the work is done when its call returns: issuing it is its time.
        assert_eq!(profile.rows[0].issued, profile.rows[0].time);

        let table = profile.table(Duration::from_millis(100));
        assert!(table.contains("VAE conv 3×3"), "{table}");
        assert!(table.contains("everything else"), "{table}");
        assert!(table.contains("issued ms"), "{table}");
        assert!(take().rows.is_empty(), "take starts counting again");
    }
}

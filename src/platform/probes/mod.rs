//! What the operating system can tell about the person's use of this PC: other programs on
//! the GPU and its temperature ([`GpuProbe`]), a full-screen foreground window
//! ([`ForegroundProbe`]), time since the last keyboard or mouse input ([`IdleProbe`]), battery
//! power ([`PowerProbe`]), and which programs run ([`ProgramProbe`]).
//!
//! One small trait per signal; these are the only platform-specific parts of the
//! good-guest policy (`policy` decides, the runtime's policy task asks). A probe that cannot
//! see on this PC says why ([`Unavailable`]), once, and the policy goes on without it.
//! [`Probes::for_this_pc`] picks the implementations for this OS and desktop.

mod battery;
#[cfg(target_os = "macos")]
mod macos;
mod nvml;
mod programs;
#[cfg(windows)]
mod windows;
#[cfg(all(unix, not(target_os = "macos")))]
mod x11;

use std::time::Duration;

pub use battery::SysfsPower;

/// Why a probe cannot see on this PC, in words for the person.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// What a probe saw, or why it cannot see.
pub type Probed<T> = Result<T, Unavailable>;

/// Another program using the GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuUser {
    pub pid: u32,
    /// The program's name (`Cyberpunk2077.exe`, `blender`), when it could be read.
    pub program: Option<String>,
    /// Its share of the GPU's compute since the last reading, in percent.
    pub percent: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuReading {
    /// Other processes using the GPU (never this worker itself).
    pub users: Vec<GpuUser>,
    pub temperature_c: Option<u32>,
}

/// The foreground window, when it covers its whole screen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FullScreen {
    /// Its program's name, when the OS says which process owns it.
    pub program: Option<String>,
    /// Its title.
    pub title: Option<String>,
}

/// Other programs on the GPU, and its temperature.
pub trait GpuProbe: Send {
    fn read(&mut self) -> Probed<GpuReading>;
}

/// A full-screen window in the foreground (`None`: there is none).
pub trait ForegroundProbe: Send {
    fn full_screen(&mut self) -> Probed<Option<FullScreen>>;
}

/// Time since the last keyboard or mouse input in this session.
pub trait IdleProbe: Send {
    fn idle_for(&mut self) -> Probed<Duration>;
}

/// Whether this PC runs on battery now (`false` on mains power and on PCs without one).
pub trait PowerProbe: Send {
    fn on_battery(&mut self) -> Probed<bool>;
}

/// The names of the programs running now, lower-case.
pub trait ProgramProbe: Send {
    fn running(&mut self) -> Probed<Vec<String>>;
}

/// One probe per signal.
pub struct Probes {
    pub gpu: Box<dyn GpuProbe>,
    pub foreground: Box<dyn ForegroundProbe>,
    pub idle: Box<dyn IdleProbe>,
    pub power: Box<dyn PowerProbe>,
    pub programs: Box<dyn ProgramProbe>,
}

/// A probe for a signal this OS or desktop does not offer.
pub struct Blind(pub &'static str);

impl GpuProbe for Blind {
    fn read(&mut self) -> Probed<GpuReading> {
        Err(Unavailable(self.0.to_owned()))
    }
}

impl ForegroundProbe for Blind {
    fn full_screen(&mut self) -> Probed<Option<FullScreen>> {
        Err(Unavailable(self.0.to_owned()))
    }
}

impl IdleProbe for Blind {
    fn idle_for(&mut self) -> Probed<Duration> {
        Err(Unavailable(self.0.to_owned()))
    }
}

impl PowerProbe for Blind {
    fn on_battery(&mut self) -> Probed<bool> {
        Err(Unavailable(self.0.to_owned()))
    }
}

impl ProgramProbe for Blind {
    fn running(&mut self) -> Probed<Vec<String>> {
        Err(Unavailable(self.0.to_owned()))
    }
}

impl Probes {
    /// The probes this OS and desktop offer; the others say why not.
    pub fn for_this_pc() -> Self {
        Self {
            gpu: nvml::NvmlGpu::open(),
            foreground: foreground_probe(),
            idle: idle_probe(),
            power: power_probe(),
            programs: Box::new(programs::RunningPrograms::new()),
        }
    }

    /// Probes that see nothing (for a worker started without them, and tests).
    pub fn blind() -> Self {
        Self {
            gpu: Box::new(Blind("not watched")),
            foreground: Box::new(Blind("not watched")),
            idle: Box::new(Blind("not watched")),
            power: Box::new(Blind("not watched")),
            programs: Box::new(Blind("not watched")),
        }
    }
}

/// The name a process's program goes by (`Cyberpunk2077.exe`, `blender`), if it still runs.
pub fn program_name(pid: u32) -> Option<String> {
    programs::name_of(pid)
}

#[cfg(all(unix, not(target_os = "macos")))]
fn foreground_probe() -> Box<dyn ForegroundProbe> {
    if on_wayland() {
        return Box::new(Blind(
            "Wayland does not let a program see other programs' windows",
        ));
    }
    match x11::X11Session::connect() {
        Ok(session) => Box::new(session),
        Err(Unavailable(why)) => Box::new(BlindWith(why)),
    }
}

#[cfg(all(unix, not(target_os = "macos")))]
fn idle_probe() -> Box<dyn IdleProbe> {
    if on_wayland() {
        return Box::new(Blind(
            "Wayland does not tell programs when you last used the keyboard or mouse",
        ));
    }
    match x11::X11Session::connect() {
        Ok(session) => Box::new(session),
        Err(Unavailable(why)) => Box::new(BlindWith(why)),
    }
}

#[cfg(all(unix, not(target_os = "macos")))]
fn power_probe() -> Box<dyn PowerProbe> {
    Box::new(SysfsPower::new(std::path::PathBuf::from(
        "/sys/class/power_supply",
    )))
}

#[cfg(all(unix, not(target_os = "macos")))]
fn on_wayland() -> bool {
    std::env::var_os("WAYLAND_DISPLAY").is_some_and(|display| !display.is_empty())
}

#[cfg(windows)]
fn foreground_probe() -> Box<dyn ForegroundProbe> {
    Box::new(windows::WindowsSession)
}

#[cfg(windows)]
fn idle_probe() -> Box<dyn IdleProbe> {
    Box::new(windows::WindowsSession)
}

#[cfg(windows)]
fn power_probe() -> Box<dyn PowerProbe> {
    Box::new(windows::WindowsSession)
}

#[cfg(target_os = "macos")]
fn foreground_probe() -> Box<dyn ForegroundProbe> {
    Box::new(Blind(
        "macOS does not tell programs whether another one is full screen",
    ))
}

#[cfg(target_os = "macos")]
fn idle_probe() -> Box<dyn IdleProbe> {
    Box::new(macos::MacSession)
}

#[cfg(target_os = "macos")]
fn power_probe() -> Box<dyn PowerProbe> {
    Box::new(macos::MacSession)
}

/// A probe that cannot see, for a reason found at run time.
#[cfg(all(unix, not(target_os = "macos")))]
struct BlindWith(String);

#[cfg(all(unix, not(target_os = "macos")))]
impl ForegroundProbe for BlindWith {
    fn full_screen(&mut self) -> Probed<Option<FullScreen>> {
        Err(Unavailable(self.0.clone()))
    }
}

#[cfg(all(unix, not(target_os = "macos")))]
impl IdleProbe for BlindWith {
    fn idle_for(&mut self) -> Probed<Duration> {
        Err(Unavailable(self.0.clone()))
    }
}

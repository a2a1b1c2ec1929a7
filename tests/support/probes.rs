//! A PC the tests play for the good-guest policy: what its probes see, set by the test as it
//! goes (a game starts, the GPU heats up, the laptop is unplugged).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use studio_worker::platform::probes::{
    ForegroundProbe, FullScreen, GpuProbe, GpuReading, GpuUser, IdleProbe, PowerProbe, Probed,
    Probes, ProgramProbe,
};

#[derive(Clone, Default)]
pub struct FakePc(Arc<Mutex<Seen>>);

#[derive(Default)]
struct Seen {
    gpu: GpuReading,
    full_screen: Option<FullScreen>,
    idle: Duration,
    on_battery: bool,
    programs: Vec<String>,
}

impl FakePc {
    pub fn new() -> Self {
        let pc = Self::default();
        pc.set(|seen| {
            seen.gpu.temperature_c = Some(50);
            seen.idle = Duration::from_secs(3600);
        });
        pc
    }

    /// The probes of this PC, for `RuntimeOptions::probes`.
    pub fn probes(&self) -> Probes {
        Probes {
            gpu: Box::new(self.clone()),
            foreground: Box::new(self.clone()),
            idle: Box::new(self.clone()),
            power: Box::new(self.clone()),
            programs: Box::new(self.clone()),
        }
    }

    fn set(&self, change: impl FnOnce(&mut Seen)) {
        change(&mut self.0.lock().unwrap());
    }

    /// A game takes the GPU.
    pub fn start_game(&self, program: &str) {
        let program = program.to_owned();
        self.set(|seen| {
            seen.gpu.users = vec![GpuUser {
                pid: 4242,
                program: Some(program),
                percent: 92,
            }];
        });
    }

    pub fn stop_game(&self) {
        self.set(|seen| seen.gpu.users.clear());
    }

    pub fn set_temperature(&self, celsius: u32) {
        self.set(|seen| seen.gpu.temperature_c = Some(celsius));
    }

    pub fn set_on_battery(&self, on_battery: bool) {
        self.set(|seen| seen.on_battery = on_battery);
    }
}

impl GpuProbe for FakePc {
    fn read(&mut self) -> Probed<GpuReading> {
        Ok(self.0.lock().unwrap().gpu.clone())
    }
}

impl ForegroundProbe for FakePc {
    fn full_screen(&mut self) -> Probed<Option<FullScreen>> {
        Ok(self.0.lock().unwrap().full_screen.clone())
    }
}

impl IdleProbe for FakePc {
    fn idle_for(&mut self) -> Probed<Duration> {
        Ok(self.0.lock().unwrap().idle)
    }
}

impl PowerProbe for FakePc {
    fn on_battery(&mut self) -> Probed<bool> {
        Ok(self.0.lock().unwrap().on_battery)
    }
}

impl ProgramProbe for FakePc {
    fn running(&mut self) -> Probed<Vec<String>> {
        Ok(self.0.lock().unwrap().programs.clone())
    }
}

//! The GPU probe on NVIDIA cards (every OS with an NVIDIA driver): other processes' share of
//! the GPU's compute and the GPU's temperature, through the driver's NVML library, loaded at
//! run time (`libnvidia-ml.so.1`, `nvml.dll`). Without it this probe says so and the policy
//! goes on without it.
//!
//! Per-process use is NVML's process utilisation sampling: each reading asks only for the
//! samples since the previous one (passing the last timestamp back, at most a few seconds
//! old), and "no sample since then" means nobody used the GPU. This worker's own process
//! never counts. That query costs milliseconds, so it is made only while the whole GPU is
//! busy (the cheap device-wide rate says so); an idle GPU needs no names.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;

use super::{GpuProbe, GpuReading, GpuUser, Probed, Unavailable};

/// Below this device-wide share nobody uses the GPU heavily: no per-process query.
const QUIET_PERCENT: u32 = 5;
/// Samples older than this are not asked for (a game that ended then has ended).
const LOOK_BACK: Duration = Duration::from_secs(3);

pub(super) struct NvmlGpu {
    nvml: Nvml,
    /// The newest sample's timestamp seen (µs, the driver's clock).
    last_seen: u64,
    /// Program names by pid, read once per process.
    names: BTreeMap<u32, Option<String>>,
}

impl NvmlGpu {
    /// The probe, or one that says why NVML is not there.
    pub(super) fn open() -> Box<dyn GpuProbe> {
        match Nvml::init() {
            Ok(nvml) => Box::new(Self {
                nvml,
                last_seen: 0,
                names: BTreeMap::new(),
            }),
            Err(error) => Box::new(super::Blind(match error {
                NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => {
                    "no NVIDIA driver (NVML) found"
                }
                _ => "the NVIDIA driver's NVML did not start",
            })),
        }
    }
}

impl GpuProbe for NvmlGpu {
    fn read(&mut self) -> Probed<GpuReading> {
        let device = self
            .nvml
            .device_by_index(0)
            .map_err(|error| Unavailable(format!("NVML sees no GPU ({error})")))?;
        let temperature_c = device.temperature(TemperatureSensor::Gpu).ok();
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |now| u64::try_from(now.as_micros()).unwrap_or(u64::MAX));
        let device_busy = device.utilization_rates().map_or(100, |rates| rates.gpu);
        if device_busy < QUIET_PERCENT {
            self.last_seen = now_us;
            self.names.clear();
            return Ok(GpuReading {
                users: Vec::new(),
                temperature_c,
            });
        }
        let since = samples_since(self.last_seen, now_us);
        let samples = match device.process_utilization_stats(since) {
            Ok(samples) => samples,
            // No sample since the last reading: nobody used the GPU.
            Err(NvmlError::NotFound) => Vec::new(),
            Err(error) => {
                return Err(Unavailable(format!(
                    "this GPU does not report other programs' use ({error})"
                )));
            }
        };
        let own_pid = std::process::id();
        let mut busiest: BTreeMap<u32, u32> = BTreeMap::new();
        for sample in &samples {
            self.last_seen = self.last_seen.max(sample.timestamp);
            if sample.pid != own_pid {
                let percent = busiest.entry(sample.pid).or_default();
                *percent = (*percent).max(sample.sm_util);
            }
        }
        // Forget the names of processes gone from the GPU, so a reused pid is named anew.
        self.names.retain(|pid, _| busiest.contains_key(pid));
        let users = busiest
            .into_iter()
            .map(|(pid, percent)| GpuUser {
                pid,
                program: self
                    .names
                    .entry(pid)
                    .or_insert_with(|| super::program_name(pid))
                    .clone(),
                percent,
            })
            .collect();
        Ok(GpuReading {
            users,
            temperature_c,
        })
    }
}

/// The timestamp (µs) to ask for samples after: the last one seen, but never further back
/// than [`LOOK_BACK`] (after a quiet spell, old samples describe the past).
fn samples_since(last_seen: u64, now_us: u64) -> u64 {
    let look_back = u64::try_from(LOOK_BACK.as_micros()).unwrap_or(u64::MAX);
    last_seen.max(now_us.saturating_sub(look_back))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_asked_for_since_the_last_one_but_never_from_long_ago() {
        let now = 1_800_000_000_000_000;
        assert_eq!(samples_since(now - 1_000_000, now), now - 1_000_000);
        assert_eq!(samples_since(0, now), now - 3_000_000);
        assert_eq!(samples_since(0, 5), 0);
    }
}

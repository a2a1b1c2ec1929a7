//! Facts about this computer for the studio's capabilities (studio-api.md §4): OS, CPU
//! architecture, and (until a GPU engine reports better) the CPU and its memory.

use crate::vocab::device::{DeviceInfo, DeviceKind};

/// `windows`, `macos` or `linux` (the protocol's names); other systems report Rust's name.
pub fn os_name() -> &'static str {
    std::env::consts::OS
}

/// `x86_64` or `aarch64`.
pub fn arch_name() -> &'static str {
    std::env::consts::ARCH
}

/// The CPU as an inference device: its brand name and the machine's RAM.
pub fn cpu_device() -> DeviceInfo {
    let Ok(mut system) = sysinfo::System::new() else {
        return DeviceInfo {
            kind: DeviceKind::Cpu,
            name: "CPU".to_owned(),
            memory_mb: 0,
        };
    };
    system.refresh_memory();
    system.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
    let brand = system
        .cpus()
        .first()
        .map(|cpu| cpu.brand().trim().to_owned())
        .filter(|brand| !brand.is_empty())
        .unwrap_or_else(|| "CPU".to_owned());
    let cores = system.cpus().len();
    DeviceInfo {
        kind: DeviceKind::Cpu,
        name: format!("{brand} ({cores} threads)"),
        memory_mb: system.total_memory() / (1024 * 1024),
    }
}

/// Whether a process with this id is running (it may, rarely, be another program that got a
/// recycled id; callers use this for advice, never to decide anything destructive alone). A
/// process that exited but was not yet reaped by its parent (a zombie) is not running.
pub fn process_alive(pid: u32) -> bool {
    let pid = sysinfo::Pid::from_u32(pid);
    let Ok(mut system) = sysinfo::System::new() else {
        return false;
    };
    system.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), true);
    system
        .process(pid)
        .is_some_and(|process| process.status() != sysinfo::ProcessStatus::Zombie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_device_reports_memory_and_a_name() {
        let device = cpu_device();
        assert_eq!(device.kind, DeviceKind::Cpu);
        assert!(device.memory_mb > 0, "{device:?}");
        assert!(!device.name.is_empty());
        assert!(["linux", "macos", "windows"].contains(&os_name()));
    }

    #[test]
    fn this_process_is_alive() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX - 7));
    }
}
